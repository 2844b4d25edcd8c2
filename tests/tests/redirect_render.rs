//! The render backend tells the truth: the text it prints, fed to `nft -f`
//! or `iptables-restore`, produces exactly what the nft (netlink) and
//! iptables backends install.

mod redirect_common;

use std::io::Write;
use std::process::Stdio;

use forwarder_plugin::rules::plan::Family;
use forwarder_plugin::rules::{
    BackendKind, BackendOptions, Owner, RenderFormat, Variant, get_backend, render,
};
use nsm_tests::netns::TestNetns;
use redirect_common::plan;

const SPECS: [&str; 5] = [
    "{}",
    r#"{"mode": "tproxy", "ipv6": true, "captureDns": true, "dropInvalid": true,
        "excludeOutboundCidrs": ["198.19.0.0/15", "fd00:1::/64", "10.1.2.0/23"],
        "includeInboundPorts": [8080, 9090], "excludeInterfaces": ["eth9"],
        "proxyGids": [1500], "tproxyMark": "0x111", "bypassMark": "0x539/0xfff"}"#,
    r#"{"proxyUids": [], "proxyGids": [], "bypassMark": 1337, "captureDns": true,
        "includeOutboundCidrs": ["198.18.0.0/16", "fd00::/8"], "ipv6": true}"#,
    r#"{"includeOutboundPorts": [80, 443], "includeOutboundCidrs": [],
        "excludeInboundPorts": [], "outboundPort": 4140, "inboundPort": 4143}"#,
    // An endpoint's capture: an interface set and nothing outbound.
    r#"{"includeInterfaces": ["nsm-b", "nsm-a"], "includeOutboundCidrs": [], "ipv6": true,
        "excludeInboundPorts": [], "inboundPort": 15001, "outboundPort": 15002}"#,
];

/// `nft -j list ruleset` without handles (they number every object anew).
fn nft_json(ns: &TestNetns) -> serde_json::Value {
    let text = ns.exec_ok(&["nft", "-j", "list", "ruleset"]);
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("nft json");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.remove("metainfo");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// Compares object by object, printing only the ones that differ.
#[track_caller]
fn assert_same_json(netlink: &serde_json::Value, text: &serde_json::Value, spec: &str) {
    let items = |v: &serde_json::Value| v["nftables"].as_array().cloned().unwrap_or_default();
    let (a, b) = (items(netlink), items(text));
    let only = |x: &[serde_json::Value], y: &[serde_json::Value]| -> Vec<String> {
        x.iter()
            .filter(|i| !y.contains(i))
            .map(|i| i.to_string())
            .collect()
    };
    let (missing, extra) = (only(&b, &a), only(&a, &b));
    assert!(
        missing.is_empty() && extra.is_empty() && a == b,
        "spec {spec}\nonly from nft -f:\n{}\nonly from netlink:\n{}",
        missing.join("\n"),
        extra.join("\n")
    );
}

fn feed(ns: &TestNetns, argv: &[&str], input: &str) {
    let mut c = ns.command(argv[0]);
    c.args(&argv[1..])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nft_render_matches_what_netlink_installs() {
    if !nsm_tests::require_root("nft_render_matches_what_netlink_installs")
        || !nsm_tests::require_tool("nft_render_matches_what_netlink_installs", "nft")
    {
        return;
    }
    for spec in SPECS {
        let p = plan(spec);
        let (a, b) = (TestNetns::new("rna"), TestNetns::new("rnb"));
        let netlink = get_backend(BackendKind::Nft, BackendOptions::default());
        netlink
            .apply(&forwarder_plugin::netns::Netns::open(a.name()).unwrap(), &p)
            .unwrap();
        feed(
            &b,
            &["nft", "-f", "-"],
            &render::nft_script(&p, &Owner::default()),
        );
        assert_same_json(&nft_json(&a), &nft_json(&b), spec);
        // And what `render` prints is that script.
        let r = forwarder_plugin::rules::RenderBackend::new(
            RenderFormat::Nft,
            Owner::default(),
            Box::new(std::io::sink()),
        );
        assert!(
            r.text(&p)
                .starts_with(&render::nft_script(&p, &Owner::default()))
        );
    }
}

#[test]
fn iptables_render_matches_what_the_backend_installs() {
    if !nsm_tests::require_root("iptables_render_matches_what_the_backend_installs") {
        return;
    }
    let save = |ns: &TestNetns, tool: &str| -> String {
        ns.exec_ok(&[tool])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
            .join("\n")
    };
    for spec in SPECS {
        let p = plan(spec);
        let (a, b) = (TestNetns::new("ria"), TestNetns::new("rib"));
        let backend = get_backend(
            BackendKind::Iptables,
            BackendOptions {
                iptables_variant: Some(Variant::Nft),
                ..Default::default()
            },
        );
        backend
            .apply(&forwarder_plugin::netns::Netns::open(a.name()).unwrap(), &p)
            .unwrap();
        for (family, tool) in [(Family::V4, "iptables-nft"), (Family::V6, "ip6tables-nft")] {
            let doc = render::iptables_restore(&p, &Owner::default(), family);
            if !doc.is_empty() {
                feed(&b, &[&format!("{tool}-restore"), "--noflush"], &doc.text());
            }
            let tool = format!("{tool}-save");
            assert_eq!(save(&a, &tool), save(&b, &tool), "spec {spec} ({tool})");
        }
    }
}
