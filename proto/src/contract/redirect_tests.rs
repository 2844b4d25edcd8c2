use super::*;

fn err(text: &str) -> String {
    RedirectSpec::parse(text).unwrap_err().to_string()
}

#[test]
fn empty_documents_mean_istio_defaults() {
    for text in ["{}", "", "version: 1\n"] {
        let s = RedirectSpec::parse(text).unwrap();
        assert_eq!(s, RedirectSpec::default(), "{text:?}");
    }
    let d = RedirectSpec::default();
    assert_eq!(d.outbound_port, Port(15001));
    assert_eq!(d.inbound_port, Port(15006));
    assert_eq!(d.dns_port, Port(15053));
    assert_eq!(d.proxy_uids, vec![1337]);
    assert_eq!(d.include_outbound_cidrs, Selection::All);
    assert_eq!(d.include_inbound_ports, Selection::All);
}

#[test]
fn json_and_yaml_read_the_same_spec() {
    let json = r#"{"mode":"tproxy","tproxyMark":"0x111","outboundPort":"15101","proxyUids":[1000,1001],
        "bypassMark":"0x539/0xfff","includeOutboundCidrs":"10.0.0.0/8, 192.168.0.1",
        "excludeOutboundPorts":"15020,9090","includeInboundPorts":"*","captureDns":true,
        "excludeInterfaces":["eth1"],"dropInvalid":true}"#;
    let yaml = "mode: TPROXY\ntproxyMark: 0x111\noutboundPort: 15101\nproxyUids: [1000, 1001]\n\
                bypassMark: 0x539/0xfff\nincludeOutboundCidrs: [10.0.0.0/8, 192.168.0.1]\n\
                excludeOutboundPorts: [15020, 9090]\nincludeInboundPorts: '*'\n\
                captureDNS: true\nexcludeInterfaces: [eth1]\ndropInvalid: true\n";
    let a = RedirectSpec::parse(json).unwrap();
    let b = RedirectSpec::parse(yaml).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.mode, Mode::Tproxy);
    assert_eq!(
        a.bypass_mark,
        Some(Mark {
            value: 0x539,
            mask: 0xfff
        })
    );
    assert_eq!(
        a.include_outbound_cidrs,
        Selection::List(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.168.0.1/32".parse().unwrap()
        ])
    );
    // Round trip through the extra_context form.
    assert_eq!(RedirectSpec::from_json(&a.to_json()).unwrap(), a);
}

#[test]
fn unknown_fields_are_named() {
    let e = err(r#"{"outboundPrt": 1}"#);
    assert!(e.contains("unknown field `outboundPrt`"), "{e}");
    let e = err("inboundPorts: [80]\n");
    assert!(e.contains("unknown field `inboundPorts`"), "{e}");
}

#[test]
fn ports_out_of_range_are_refused() {
    for (text, want) in [
        (
            r#"{"outboundPort": 70000}"#,
            "port 70000 out of range (1-65535)",
        ),
        (r#"{"inboundPort": 0}"#, "port 0 out of range"),
        (
            r#"{"excludeInboundPorts": [80, -1]}"#,
            "port -1 out of range",
        ),
        (
            r#"{"includeOutboundPorts": "80,99999"}"#,
            "port 99999 out of range",
        ),
        (r#"{"dnsPort": "x"}"#, "\"x\" is not a port number"),
        (
            r#"{"excludeOutboundPorts": "*"}"#,
            "\"*\" (all) is not allowed here",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
}

/// istio reads `*` anywhere in a list as "everything" (its annotations
/// `includeOutboundIPRanges: "10.0.0.0/8,*"`); so do the fields that allow it.
#[test]
fn a_star_element_means_all_where_all_is_allowed() {
    for text in [
        r#"{"includeOutboundCidrs": ["10.0.0.0/8", "*"]}"#,
        r#"{"includeOutboundCidrs": "10.0.0.0/8, *"}"#,
        r#"{"includeInboundPorts": "80,*"}"#,
        r#"{"includeInboundPorts": [80, "*"]}"#,
    ] {
        let s = RedirectSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(
            s.include_outbound_cidrs == Selection::All && text.contains("Cidrs")
                || s.include_inbound_ports == Selection::All && text.contains("Ports"),
            "{text}: {s:?}"
        );
    }
}

#[test]
fn bad_cidrs_are_refused() {
    for (text, want) in [
        (
            r#"{"excludeOutboundCidrs": ["10.0.0.300/8"]}"#,
            "is not a CIDR",
        ),
        (
            r#"{"excludeOutboundCidrs": ["10.0.0.0/33"]}"#,
            "is not a CIDR",
        ),
        (
            r#"{"excludeOutboundCidrs": "*"}"#,
            "\"*\" (all) is not allowed here",
        ),
        (
            r#"{"excludeOutboundCidrs": ["10.0.0.0/8", "*"]}"#,
            "\"*\" (all) is not allowed here",
        ),
        (
            r#"{"excludeOutboundCidrs": ["fd00::/8"]}"#,
            "IPv6 prefix but ipv6 is false",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
    assert!(RedirectSpec::parse(r#"{"ipv6": true, "excludeOutboundCidrs": ["fd00::/8"]}"#).is_ok());
}

#[test]
fn bad_interface_names_are_refused() {
    for name in [
        "a/b",
        "eth 0",
        "eth\\u0001",
        "sixteen-chars-xx",
        "",
        "x\\\"y",
        "eth+",
        "a;b",
    ] {
        for field in ["excludeInterfaces", "includeInterfaces"] {
            let e = err(&format!(r#"{{"{field}": ["{name}"]}}"#));
            assert!(e.starts_with(field), "{name}: {e}");
        }
    }
    assert!(RedirectSpec::parse(r#"{"excludeInterfaces": ["eth0.100", "veth_a-b"]}"#).is_ok());
    assert!(RedirectSpec::parse(r#"{"includeInterfaces": ["nsm-1", "lo"]}"#).is_ok());
}

#[test]
fn include_interfaces_is_additive_to_version_1() {
    // Absent: empty, and an empty list is not written, so a spec that does
    // not use it reads in builds that predate the field.
    let d = RedirectSpec::parse("{}").unwrap();
    assert!(d.include_interfaces.is_empty());
    assert!(
        !d.to_json().contains("includeInterfaces"),
        "{}",
        d.to_json()
    );
    let s = RedirectSpec::parse(r#"{"version": 1, "includeInterfaces": ["b-if", "a-if", "b-if"]}"#)
        .unwrap();
    assert!(
        s.to_json()
            .contains(r#""includeInterfaces":["b-if","a-if","b-if"]"#)
    );
    assert_eq!(RedirectSpec::from_json(&s.to_json()).unwrap(), s);
    // Order and repeats carry no meaning.
    assert_eq!(s.normalized().include_interfaces, ["a-if", "b-if"]);
}

#[test]
fn impossible_combinations_are_refused() {
    for (text, want) in [
        (r#"{"version": 2}"#, "unsupported spec version 2"),
        (
            r#"{"outboundPort": 15006}"#,
            "outboundPort and inboundPort are both 15006",
        ),
        (
            r#"{"captureDns": true, "dnsPort": 15001}"#,
            "dnsPort and outboundPort are both 15001",
        ),
        (
            r#"{"proxyUids": [], "proxyGids": []}"#,
            "no way to tell the proxy's own traffic",
        ),
        (r#"{"proxyUids": [4294967295]}"#, "not a usable id"),
        (r#"{"bypassMark": "0x1000/0xfff"}"#, "bits outside the mask"),
        (r#"{"bypassMark": 0}"#, "must be non-zero"),
        (r#"{"bypassMark": "zz"}"#, "is not a mark"),
        (
            r#"{"mode": "tproxy", "tproxyRouteTable": 254}"#,
            "254 is reserved",
        ),
        (r#"{"mode": "tproxy", "tproxyMark": 1338}"#, "hairpin"),
        (
            r#"{"mode": "tproxy", "bypassMark": "0x539/0xfff"}"#,
            "would also match bypassMark",
        ),
        (
            r#"{"mode": "transparent"}"#,
            "unknown variant `transparent`",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
    // A mark-only identity is enough (ambient style).
    assert!(
        RedirectSpec::parse(r#"{"proxyUids": [], "proxyGids": [], "bypassMark": 1337}"#).is_ok()
    );
}

#[test]
fn normalization_dedups_and_truncates() {
    let s = RedirectSpec::parse(
        r#"{"proxyUids": [1, 1, 2], "excludeOutboundCidrs": ["10.1.2.3/8", "10.0.0.0/8"]}"#,
    )
    .unwrap()
    .normalized();
    assert_eq!(s.proxy_uids, vec![1, 2]);
    assert_eq!(
        s.exclude_outbound_cidrs,
        vec!["10.0.0.0/8".parse().unwrap()]
    );
}
