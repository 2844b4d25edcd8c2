//! Kernel state under apply / verify / reconcile / cleanup, for every
//! backend: re-applying changes nothing, cleanup leaves nothing of ours, a
//! rule deleted or added by hand is reported and repaired, and an apply the
//! kernel refuses leaves the namespace as it was.

#[macro_use]
mod redirect_common;

use forwarder_plugin::rules::{self, DriftItem, Outcome, Plan, RedirectSpec, RulesError};
use nsm_tests::topology::{Client, PEER_V4, POD_V4, v4};
use redirect_common::{
    Kind, Lab, State, app, assert_same, backend, changed_lines, faulty_backend, nft_set_members,
    plan, state,
};

/// Everything the spec can switch on at once.
const RICH: &str = r#"{"mode": "tproxy", "ipv6": true, "captureDns": true, "dropInvalid": true,
    "excludeOutboundCidrs": ["198.19.1.0/24", "fd00:1::/64"], "excludeInterfaces": ["eth9"],
    "includeOutboundPorts": [7070], "proxyGids": [1337, 1500]}"#;

fn root(name: &str) -> bool {
    nsm_tests::require_root(name)
}

fn apply_twice_changes_nothing(kind: Kind) {
    if !root("apply_twice_changes_nothing") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let p = plan(RICH);
    assert_eq!(b.apply(lab.pod(), &p).unwrap(), Outcome::Applied);
    let first = state(&lab.topo.pod);
    assert!(first.mentions_ours());
    // Check-then-apply: nothing is written the second time.
    assert_eq!(b.apply(lab.pod(), &p).unwrap(), Outcome::Unchanged);
    assert_same(
        &first,
        &state(&lab.topo.pod),
        "second apply changed the namespace",
    );
    assert!(b.verify(lab.pod(), &p).unwrap().is_empty());
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "pod-out");
}

/// A different spec over an existing one replaces it: chains the new spec
/// does not use are gone, and verify against the new spec is clean.
fn a_new_spec_replaces_the_old_one(kind: Kind) {
    if !root("a_new_spec_replaces_the_old_one") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let big = plan(r#"{"captureDns": true, "dropInvalid": true, "ipv6": true}"#);
    let small = plan(r#"{"includeInboundPorts": [], "excludeOutboundPorts": [9090]}"#);
    b.apply(lab.pod(), &big).unwrap();
    assert_eq!(b.apply(lab.pod(), &small).unwrap(), Outcome::Applied);
    assert!(b.verify(lab.pod(), &small).unwrap().is_empty());
    assert!(!b.verify(lab.pod(), &big).unwrap().is_empty());
    let s = state(&lab.topo.pod);
    for gone in [
        "raw",
        "mangle",
        "OUTPUT_DNS",
        "output_dns",
        "INBOUND",
        "inbound",
        "ip6",
    ] {
        assert!(
            !s.nft.contains(&format!("mesh_proxy {gone}"))
                && !s.nft.contains(&format!("chain {gone}"))
                && !s.xtables.contains(&format!("MESH_PROXY_{gone}")),
            "{gone} left over"
        );
    }
    assert_eq!(lab.out(app(), v4(PEER_V4, 9090)).label, "peer");
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "pod-out");
    // Back to the big one.
    b.apply(lab.pod(), &big).unwrap();
    assert!(b.verify(lab.pod(), &big).unwrap().is_empty());
}

fn cleanup_leaves_nothing(kind: Kind) {
    if !root("cleanup_leaves_nothing") {
        return;
    }
    let lab = Lab::new();
    let before = state(&lab.topo.pod);
    assert!(!before.mentions_ours());
    let b = backend(kind);
    b.apply(lab.pod(), &plan(RICH)).unwrap();
    let applied = state(&lab.topo.pod);
    assert!(
        applied.ip_rules.contains("lookup 133"),
        "{}",
        applied.ip_rules
    );
    assert!(applied.routes.contains("table 133"), "{}", applied.routes);
    b.cleanup(lab.pod()).unwrap();
    let after = state(&lab.topo.pod);
    assert_same(
        &before,
        &after,
        "cleanup must restore the namespace exactly",
    );
    // Cleanup again is fine, and traffic is direct again.
    b.cleanup(lab.pod()).unwrap();
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "peer");
    // And verify now reports everything missing.
    assert!(!b.verify(lab.pod(), &plan(RICH)).unwrap().is_empty());
}

/// Removes the rule exempting uid 1337 by hand, the way an operator would.
fn delete_uid_rule_by_hand(kind: Kind, lab: &Lab) {
    let pod = &lab.topo.pod;
    match kind {
        Kind::Nft => {
            let listing = pod.exec_ok(&[
                "nft",
                "-a",
                "list",
                "chain",
                "inet",
                "mesh_proxy",
                "nat_output",
            ]);
            let handle = listing
                .lines()
                .find(|l| l.contains("meta skuid 1337 return"))
                .and_then(|l| l.rsplit("handle ").next())
                .unwrap_or_else(|| panic!("uid rule not found in\n{listing}"))
                .trim()
                .to_owned();
            pod.exec_ok(&[
                "nft",
                "delete",
                "rule",
                "inet",
                "mesh_proxy",
                "nat_output",
                "handle",
                &handle,
            ]);
        }
        Kind::Iptables | Kind::IptablesLegacy => {
            let tool = if kind == Kind::Iptables {
                "iptables-nft"
            } else {
                "iptables-legacy"
            };
            let listing = pod.exec_ok(&[tool, "-t", "nat", "-S", "MESH_PROXY_OUTPUT"]);
            // -S prints the -N line first, then the rules numbered from 1.
            let n = listing
                .lines()
                .filter(|l| l.starts_with("-A"))
                .position(|l| {
                    l.contains("--uid-owner 1337")
                        && l.ends_with("-j RETURN")
                        && !l.contains("! --uid-owner")
                        && !l.contains("-o lo")
                })
                .unwrap_or_else(|| panic!("uid rule not found in\n{listing}"))
                + 1;
            pod.exec_ok(&[tool, "-t", "nat", "-D", "MESH_PROXY_OUTPUT", &n.to_string()]);
        }
    }
}

fn verify_reports_a_deleted_rule_and_reconcile_restores_it(kind: Kind) {
    if !root("verify_reports_a_deleted_rule_and_reconcile_restores_it") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let p = plan("{}");
    b.apply(lab.pod(), &p).unwrap();
    let dst = v4(PEER_V4, 8080);
    assert_eq!(lab.out(Client::uid(1337), dst).label, "peer");
    delete_uid_rule_by_hand(kind, &lab);
    // The drift matters: the proxy's own connection now loops into itself.
    assert_eq!(lab.out(Client::uid(1337), dst).label, "pod-out");
    let drift = b.verify(lab.pod(), &p).unwrap();
    assert_eq!(drift.items.len(), 1, "{drift}");
    let DriftItem::MissingRule { chain, rule } = &drift.items[0] else {
        panic!("expected a missing rule, got {drift}");
    };
    assert!(
        chain.ends_with("nat_output") || chain.ends_with("MESH_PROXY_OUTPUT"),
        "{chain}"
    );
    assert!(
        rule.contains("skuid 1337 return") || rule.contains("--uid-owner 1337 -m comment"),
        "{rule}"
    );

    let repaired = rules::reconcile(b.as_ref(), lab.pod(), &p).unwrap();
    assert_eq!(repaired, drift);
    assert!(b.verify(lab.pod(), &p).unwrap().is_empty());
    assert_eq!(lab.out(Client::uid(1337), dst).label, "peer");
    // Nothing left to repair.
    assert!(
        rules::reconcile(b.as_ref(), lab.pod(), &p)
            .unwrap()
            .is_empty()
    );
}

fn verify_reports_an_added_rule_and_reconcile_removes_it(kind: Kind) {
    if !root("verify_reports_an_added_rule_and_reconcile_removes_it") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let p = plan("{}");
    b.apply(lab.pod(), &p).unwrap();
    let pod = &lab.topo.pod;
    match kind {
        Kind::Nft => {
            pod.exec_ok(&[
                "nft",
                "insert",
                "rule",
                "inet",
                "mesh_proxy",
                "nat_output",
                "return",
            ]);
        }
        Kind::Iptables => {
            pod.exec_ok(&[
                "iptables-nft",
                "-t",
                "nat",
                "-I",
                "MESH_PROXY_OUTPUT",
                "1",
                "-j",
                "RETURN",
            ]);
        }
        Kind::IptablesLegacy => {
            pod.exec_ok(&[
                "iptables-legacy",
                "-t",
                "nat",
                "-I",
                "MESH_PROXY_OUTPUT",
                "1",
                "-j",
                "RETURN",
            ]);
        }
    }
    let dst = v4(PEER_V4, 8080);
    assert_eq!(
        lab.out(app(), dst).label,
        "peer",
        "the foreign rule bypasses the proxy"
    );
    let drift = b.verify(lab.pod(), &p).unwrap();
    assert!(
        matches!(drift.items.as_slice(), [DriftItem::ExtraRule { .. }]),
        "{drift}"
    );
    rules::reconcile(b.as_ref(), lab.pod(), &p).unwrap();
    assert!(b.verify(lab.pod(), &p).unwrap().is_empty());
    assert_eq!(lab.out(app(), dst).label, "pod-out");
}

fn failed_apply_leaves_nothing_behind(kind: Kind) {
    if !root("failed_apply_leaves_nothing_behind") {
        return;
    }
    let lab = Lab::new();
    let before = state(&lab.topo.pod);
    let err = faulty_backend(kind)
        .apply(lab.pod(), &plan(RICH))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("DOES_NOT_EXIST") || msg.contains("rejected"),
        "{msg}"
    );
    if kind != Kind::Nft {
        // iptables-restore had committed earlier tables: they were undone.
        assert!(matches!(err, RulesError::RolledBack { .. }), "{err:?}");
    }
    assert_same(
        &before,
        &state(&lab.topo.pod),
        "failed apply left something",
    );
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "peer");
}

fn failed_apply_keeps_the_previous_rules(kind: Kind) {
    if !root("failed_apply_keeps_the_previous_rules") {
        return;
    }
    let lab = Lab::new();
    let good = plan(r#"{"excludeOutboundPorts": [9090]}"#);
    backend(kind).apply(lab.pod(), &good).unwrap();
    let before = state(&lab.topo.pod);
    faulty_backend(kind)
        .apply(lab.pod(), &plan(RICH))
        .unwrap_err();
    let after = state(&lab.topo.pod);
    assert_eq!(after.ip_rules, before.ip_rules);
    assert_eq!(after.routes, before.routes);
    assert!(backend(kind).verify(lab.pod(), &good).unwrap().is_empty());
    if kind == Kind::Nft {
        assert_same(&before, &after, "failed nft apply changed the namespace");
    }
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "pod-out");
    assert_eq!(lab.out(app(), v4(PEER_V4, 9090)).label, "peer");
}

/// An invalid spec is refused before any backend runs: nothing to apply.
fn invalid_spec_never_reaches_the_kernel(kind: Kind) {
    if !root("invalid_spec_never_reaches_the_kernel") {
        return;
    }
    let lab = Lab::new();
    let before = state(&lab.topo.pod);
    for bad in [
        r#"{"outboundPort": 70000}"#,
        r#"{"excludeInterfaces": ["../x"]}"#,
        r#"{"excludeOutboundCidrs": ["10.0.0.0/40"]}"#,
        r#"{"proxyUids": [], "proxyGids": []}"#,
    ] {
        assert!(rules::RedirectSpec::parse(bad).is_err(), "{bad}");
    }
    // The backend itself still works afterwards (and cleanup of nothing is fine).
    backend(kind).cleanup(lab.pod()).unwrap();
    assert_same(
        &before,
        &state(&lab.topo.pod),
        "cleanup of nothing changed something",
    );
}

/// A spec with thousands of `includeInterfaces` (an endpoint with that many
/// connections) applies as one transaction — larger than the default
/// netlink send buffer for nft — verifies clean and captures on the listed
/// interface.
fn thousands_of_interfaces_apply_at_once(kind: Kind) {
    if !root("thousands_of_interfaces_apply_at_once") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let mut names: Vec<String> = (0..2000).map(|i| format!("nsm{i}")).collect();
    names.push(lab.topo.pod_if.clone());
    let spec = |names: &[String]| {
        plan(&format!(
            r#"{{"includeInterfaces": {}, "includeOutboundCidrs": []}}"#,
            serde_json::to_string(names).unwrap()
        ))
    };
    let p = spec(&names);
    assert_eq!(b.apply(lab.pod(), &p).unwrap(), Outcome::Applied);
    let drift = b.verify(lab.pod(), &p).unwrap();
    assert!(drift.is_empty(), "{drift}");
    let s = state(&lab.topo.pod);
    // (iptables-nft rules show in the nft ruleset too: count each backend's own view.)
    let listed = match kind {
        Kind::Nft => nft_set_members(&lab.topo.pod, "mesh_proxy")
            .expect("the interface set")
            .iter()
            .filter(|m| m.starts_with("nsm"))
            .count(),
        _ => s.xtables.matches("-i nsm").count(),
    };
    assert_eq!(
        listed, 2000,
        "every interface in the set (nft) / one rule per interface (iptables)"
    );
    let r = lab.inbound(v4(POD_V4, 8080));
    assert_eq!(
        (r.label.as_str(), r.orig),
        ("pod-in", Some(v4(POD_V4, 8080)))
    );
    // One connection fewer: replaced as a whole again.
    names.remove(0);
    let p = spec(&names);
    assert_eq!(b.apply(lab.pod(), &p).unwrap(), Outcome::Applied);
    assert!(b.verify(lab.pod(), &p).unwrap().is_empty());
    b.cleanup(lab.pod()).unwrap();
    assert!(!state(&lab.topo.pod).mentions_ours());
}

/// Whether every changed line is about one of `names` (a set element, or
/// one interface's capture rule). iptables-nft creates a built-in chain
/// when its first rule comes: that is iptables' furniture, not ours.
#[track_caller]
fn only_members_changed(kind: Kind, lines: &[String], names: &[&str], what: &str) {
    let furniture = |l: &str| {
        kind != Kind::Nft
            && (l.ends_with("chain PREROUTING {") || l.contains("type nat hook prerouting"))
    };
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| !names.iter().any(|n| l.contains(n)) && !furniture(l))
        .collect();
    assert!(
        other.is_empty(),
        "{what} changed more than the members: {other:#?}"
    );
}

/// An endpoint's interface set: members added and removed one change at a
/// time touch nothing but those members (the ruleset diff is the set's
/// elements for nft, the members' own capture rules for iptables), verify
/// follows, traffic follows, a member deleted by hand is drift that
/// reconcile repairs, and refused changes write nothing.
fn membership_changes_touch_only_the_members(kind: Kind) {
    if !root("membership_changes_touch_only_the_members") {
        return;
    }
    let lab = Lab::new();
    let pod = &lab.topo.pod;
    // The firewall and policy routing; not the routes, where the kernel adds
    // IPv6 link-local addresses whenever it gets to it.
    let state = |ns| State {
        routes: String::new(),
        ..state(ns)
    };
    let b = backend(kind);
    let spec = RedirectSpec::parse(r#"{"includeOutboundCidrs": [], "ipv6": true}"#).unwrap();
    let with = |names: &[&str]| {
        Plan::for_interfaces(&spec, names.iter().map(|n| (*n).to_owned())).unwrap()
    };
    let nic = lab.topo.pod_if.clone();
    let empty = with(&[]);
    assert_eq!(b.apply(lab.pod(), &empty).unwrap(), Outcome::Applied);
    // An empty set captures nothing inbound.
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
    let s0 = state(pod);

    // Added in two steps, out of name order.
    b.update_interfaces(lab.pod(), &empty, &["zz-late".into()], &[])
        .unwrap();
    b.update_interfaces(lab.pod(), &empty, std::slice::from_ref(&nic), &[])
        .unwrap();
    let s1 = state(pod);
    let added = changed_lines(&s0, &s1);
    assert!(!added.is_empty(), "the members were not written");
    only_members_changed(kind, &added, &["zz-late", &nic], "adding");
    assert!(added.iter().all(|l| l.starts_with('+')), "{added:#?}");
    let two = with(&["zz-late", &nic]);
    assert!(b.verify(lab.pod(), &two).unwrap().is_empty());
    let drift = b.verify(lab.pod(), &empty).unwrap();
    assert!(!drift.is_empty(), "verify against the old members is clean");
    if kind == Kind::Nft {
        let mut members = vec![nic.clone(), "zz-late".to_owned()];
        members.sort();
        assert_eq!(nft_set_members(pod, "mesh_proxy"), Some(members));
        assert!(
            drift
                .items
                .iter()
                .all(|i| matches!(i, DriftItem::ExtraElement { .. })),
            "{drift}"
        );
    }
    let r = lab.inbound(v4(POD_V4, 8080));
    assert_eq!(
        (r.label.as_str(), r.orig),
        ("pod-in", Some(v4(POD_V4, 8080)))
    );
    // Adding what is there changes nothing.
    b.update_interfaces(lab.pod(), &empty, std::slice::from_ref(&nic), &[])
        .unwrap();
    assert_same(&s1, &state(pod), "adding a present member");

    // Removed: only that member goes, and its traffic is left alone again.
    b.update_interfaces(lab.pod(), &empty, &[], std::slice::from_ref(&nic))
        .unwrap();
    let s2 = state(pod);
    let removed = changed_lines(&s1, &s2);
    only_members_changed(kind, &removed, &["zz-late", &nic], "removing");
    assert!(
        removed
            .iter()
            .any(|l| l.starts_with('-') && l.contains(&nic)),
        "{removed:#?}"
    );
    assert!(b.verify(lab.pod(), &with(&["zz-late"])).unwrap().is_empty());
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
    // Removing an absent member changes nothing.
    b.update_interfaces(lab.pod(), &empty, &[], std::slice::from_ref(&nic))
        .unwrap();
    assert_same(&s2, &state(pod), "removing an absent member");

    // A member deleted by hand is drift, and reconcile puts it back.
    b.update_interfaces(lab.pod(), &empty, std::slice::from_ref(&nic), &[])
        .unwrap();
    match kind {
        Kind::Nft => {
            pod.exec_ok(&[
                "nft",
                "delete",
                "element",
                "inet",
                "mesh_proxy",
                "include_ifaces",
                &format!("{{ \"{nic}\" }}"),
            ]);
        }
        Kind::Iptables | Kind::IptablesLegacy => {
            let tool = if kind == Kind::Iptables {
                "iptables-nft"
            } else {
                "iptables-legacy"
            };
            let listing = pod.exec_ok(&[tool, "-t", "nat", "-S", "PREROUTING"]);
            let n = listing
                .lines()
                .filter(|l| l.starts_with("-A"))
                .position(|l| l.contains(&format!("-i {nic} ")))
                .unwrap_or_else(|| panic!("{nic}'s rule not found in\n{listing}"))
                + 1;
            pod.exec_ok(&[tool, "-t", "nat", "-D", "PREROUTING", &n.to_string()]);
        }
    }
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
    let full = with(&["zz-late", &nic]);
    let drift = b.verify(lab.pod(), &full).unwrap();
    assert_eq!(drift.items.len(), 1, "{drift}");
    assert!(drift.items[0].to_string().contains(&nic), "{drift}");
    if kind == Kind::Nft {
        assert!(
            matches!(&drift.items[0], DriftItem::MissingElement { element, .. } if *element == nic),
            "{drift}"
        );
    }
    assert_eq!(
        rules::reconcile(b.as_ref(), lab.pod(), &full).unwrap(),
        drift
    );
    assert!(b.verify(lab.pod(), &full).unwrap().is_empty());
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-in");

    // Refused before anything is written.
    let before = state(pod);
    for (add, remove, want) in [
        (vec!["lo"], vec![], "\"lo\" decides"),
        (vec!["a/b"], vec![], "a/b"),
        (vec!["x1"], vec!["x1"], "both added and removed"),
    ] {
        let add: Vec<String> = add.into_iter().map(String::from).collect();
        let remove: Vec<String> = remove.into_iter().map(String::from).collect();
        let e = b
            .update_interfaces(lab.pod(), &empty, &add, &remove)
            .unwrap_err();
        assert!(matches!(e, RulesError::Membership(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e}");
    }
    let every = plan(r#"{"includeOutboundCidrs": []}"#);
    let e = b
        .update_interfaces(lab.pod(), &every, &["x1".into()], &[])
        .unwrap_err();
    assert!(e.to_string().contains("no interface set"), "{e}");
    assert_same(&before, &state(pod), "a refused change wrote something");

    // Without the plan's rules there is nothing to add to.
    b.cleanup(lab.pod()).unwrap();
    let clean = state(pod);
    let e = b
        .update_interfaces(lab.pod(), &empty, &["x1".into()], &[])
        .unwrap_err();
    assert!(matches!(e, RulesError::NotApplied { .. }), "{e:?}");
    assert!(e.to_string().contains("apply the plan first"), "{e}");
    assert_same(
        &clean,
        &state(pod),
        "a change without the plan wrote something",
    );
}

per_backend!(
    membership_changes_touch_only_the_members,
    thousands_of_interfaces_apply_at_once,
    apply_twice_changes_nothing,
    a_new_spec_replaces_the_old_one,
    cleanup_leaves_nothing,
    verify_reports_a_deleted_rule_and_reconcile_restores_it,
    verify_reports_an_added_rule_and_reconcile_removes_it,
    failed_apply_leaves_nothing_behind,
    failed_apply_keeps_the_previous_rules,
    invalid_spec_never_reaches_the_kernel,
);
