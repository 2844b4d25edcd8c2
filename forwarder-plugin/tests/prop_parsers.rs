//! Property tests of what the forwarder side parses from callers: redirect
//! specs and capture specs (JSON in `extra_context`, YAML files), port
//! ranges, and what the hop reads from an endpoint's returned connection
//! (policy routes, the client-capture and client-redirect keys, the veth
//! plan). Arbitrary input never panics, is converted or refused, and valid
//! values round-trip. Bounded case counts; no failure files are written.

use std::collections::HashMap;

use forwarder_plugin::hop::{
    CLIENT_CAPTURE_KEY, CLIENT_REDIRECT_KEY, DEFAULT_MTU, Ends, MAX_POLICIES, MAX_POLICY_ROUTES,
    client_capture, client_redirect, policies, veth_plan,
};
use forwarder_plugin::netns::NetnsId;
use forwarder_plugin::rules::plan::{Action, Family, OwnChain};
use forwarder_plugin::rules::spec::{Mark, Mode, OUTBOUND_MARK, Port, SPEC_VERSION, Selection};
use forwarder_plugin::rules::{CaptureSpec, Plan, PortRange, RedirectSpec};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nsm_api::connection::Connection;
use nsm_api::connectioncontext::{ConnectionContext, IpContext, PolicyRoute, Route};
use nsm_api::contract::capture::CAPTURE_VERSION;
use proptest::prelude::*;
use serde_json::Value;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- values

fn v4_net() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0..=32u8)
        .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a.into(), l).expect("prefix length")))
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0..=128u8)
        .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a.into(), l).expect("prefix length")))
}

fn any_net() -> BoxedStrategy<IpNet> {
    prop_oneof![v4_net(), v6_net()].boxed()
}

fn net(ipv6: bool) -> BoxedStrategy<IpNet> {
    if ipv6 { any_net() } else { v4_net().boxed() }
}

fn port() -> impl Strategy<Value = Port> {
    prop_oneof![
        1..=u16::MAX,
        prop::sample::select(vec![1u16, 53, 80, 15001, 15006, 15053, u16::MAX]),
    ]
    .prop_map(Port)
}

fn ports() -> impl Strategy<Value = Vec<Port>> {
    prop::collection::vec(port(), 0..5)
}

/// Interface names a spec accepts (ASCII letters, digits, `._-@`, at most 15 bytes, not `.`/`..`).
fn interface() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._@-]{1,15}".prop_filter("not . or ..", |n| n != "." && n != "..")
}

/// A u32 that is often one of the values with a meaning.
fn word() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => any::<u32>(),
        1 => prop::sample::select(vec![0, 1, 133, 253, 254, 255, 1337, OUTBOUND_MARK, u32::MAX]),
    ]
}

/// A usable bypass mark: non-zero value within a non-zero mask.
fn mark() -> impl Strategy<Value = Mark> {
    (1..=u32::MAX, any::<u32>()).prop_map(|(mask, v)| {
        let value = match v & mask {
            0 => mask & mask.wrapping_neg(),
            x => x,
        };
        Mark { value, mask }
    })
}

fn valid_redirect_spec() -> impl Strategy<Value = RedirectSpec> {
    any::<bool>()
        .prop_flat_map(|ipv6| {
            let ids = || prop::collection::vec(0..u32::MAX, 0..4);
            (
                (
                    Just(ipv6),
                    prop::sample::select(vec![Mode::Redirect, Mode::Tproxy]),
                    port(),
                    port(),
                    port(),
                ),
                (ids(), ids(), prop::option::of(mark())),
                (
                    prop::option::weighted(0.7, prop::collection::vec(net(ipv6), 0..4)),
                    prop::collection::vec(net(ipv6), 0..4),
                ),
                (
                    prop::option::weighted(0.7, ports()),
                    ports(),
                    ports(),
                    ports(),
                ),
                (
                    prop::collection::vec(interface(), 0..3),
                    prop::collection::vec(interface(), 0..3),
                ),
                (any::<bool>(), any::<bool>(), word(), word()),
            )
        })
        .prop_map(
            |(
                (ipv6, mode, outbound_port, inbound_port, dns_port),
                (proxy_uids, proxy_gids, bypass_mark),
                (include_cidrs, exclude_outbound_cidrs),
                (include_in, exclude_inbound_ports, include_outbound_ports, exclude_outbound_ports),
                (exclude_interfaces, include_interfaces),
                (capture_dns, drop_invalid, tproxy_mark, tproxy_route_table),
            )| RedirectSpec {
                version: SPEC_VERSION,
                mode,
                outbound_port,
                inbound_port,
                proxy_uids,
                proxy_gids,
                bypass_mark,
                include_outbound_cidrs: include_cidrs.map_or(Selection::All, Selection::List),
                exclude_outbound_cidrs,
                include_inbound_ports: include_in.map_or(Selection::All, Selection::List),
                exclude_inbound_ports,
                include_outbound_ports,
                exclude_outbound_ports,
                exclude_interfaces,
                include_interfaces,
                capture_dns,
                dns_port,
                ipv6,
                drop_invalid,
                tproxy_mark,
                tproxy_route_table,
            },
        )
        .prop_filter("a valid spec", |s| s.validate().is_ok())
}

fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        (1..=u16::MAX).prop_map(PortRange::single),
        (1..=u16::MAX, 1..=u16::MAX).prop_map(|(a, b)| PortRange {
            lo: a.min(b),
            hi: a.max(b)
        }),
    ]
}

fn valid_capture_spec() -> impl Strategy<Value = CaptureSpec> {
    let nets = || prop::collection::vec(any_net().prop_map(|n| n.trunc()), 0..6);
    (
        nets(),
        nets(),
        prop::collection::vec(port_range(), 0..6),
        any::<bool>(),
    )
        .prop_map(|(cidrs, exclude_cidrs, ports, dns)| CaptureSpec {
            version: CAPTURE_VERSION,
            cidrs,
            exclude_cidrs,
            ports,
            dns,
        })
}

const REDIRECT_FIELDS: &[&str] = &[
    "version",
    "mode",
    "outboundPort",
    "inboundPort",
    "proxyUids",
    "proxyGids",
    "bypassMark",
    "includeOutboundCidrs",
    "excludeOutboundCidrs",
    "includeInboundPorts",
    "excludeInboundPorts",
    "includeOutboundPorts",
    "excludeOutboundPorts",
    "excludeInterfaces",
    "includeInterfaces",
    "captureDns",
    "captureDNS",
    "dnsPort",
    "ipv6",
    "dropInvalid",
    "tproxyMark",
    "tproxyRouteTable",
];

const CAPTURE_FIELDS: &[&str] = &["version", "cidrs", "excludeCidrs", "ports", "dns"];

/// JSON values as a caller might send them: the right shapes, wrong ones,
/// out-of-range numbers, strings that nearly parse, nested arrays and objects.
fn json_value(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        prop::sample::select(vec![
            "*",
            " * ",
            "",
            "1",
            "0",
            "65536",
            "-1",
            "0x539",
            "0x539/0xfff",
            "0x0/0x0",
            "1337/0",
            "10.0.0.0/8",
            "10.1.2.3/8",
            "fd00::/8",
            "fd00::1",
            "1.2.3.4",
            "80,443",
            "80, *",
            "8000-8999",
            "90-80",
            "redirect",
            "REDIRECT",
            "tproxy",
            "TPROXY",
            "lo",
            "eth0",
            "a b",
            "bad name!",
            "0123456789abcdef",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,10}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0..70000i64).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text.prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        let key = prop_oneof![
            3 => prop::sample::select(fields.to_vec()).prop_map(str::to_owned),
            1 => "[a-zA-Z]{0,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object of (mostly) the spec's own fields with arbitrary values.
fn json_object(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        6 => prop::sample::select(fields.to_vec()).prop_map(str::to_owned),
        1 => "[a-zA-Z]{0,8}",
    ];
    prop::collection::btree_map(key, json_value(fields), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Text a caller might send instead of a spec: JSON objects as above,
/// sometimes cut short or with a stray character, or anything at all.
fn json_ish(fields: &'static [&'static str]) -> impl Strategy<Value = String> {
    let spoiled = (
        json_object(fields),
        any::<prop::sample::Index>(),
        prop::option::of(any::<char>()),
    )
        .prop_map(|(v, at, stray)| {
            let text = v.to_string();
            let cut = at.index(text.len() + 1);
            // Cut or insert only on a character boundary.
            let cut = (0..=cut)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            match stray {
                None => text[..cut].to_owned(),
                Some(c) => format!("{}{c}{}", &text[..cut], &text[cut..]),
            }
        });
    prop_oneof![
        4 => json_object(fields).prop_map(|v| v.to_string()),
        2 => spoiled,
        1 => json_value(fields).prop_map(|v| v.to_string()),
        1 => any::<String>(),
    ]
}

// ---------------------------------------------------------------- specs

proptest! {
    #![proptest_config(config(512))]

    /// Any JSON-ish text is refused or accepted as a spec that validates,
    /// whose plan builds, and which reads back equal from its own `to_json`
    /// (what one hop writes, the next reads). Nothing panics, also on the
    /// YAML path of `parse`.
    #[test]
    fn redirect_spec_any_json_is_refused_or_round_trips(text in json_ish(REDIRECT_FIELDS)) {
        if let Ok(spec) = RedirectSpec::from_json(&text) {
            prop_assert_eq!(spec.validate(), Ok(()));
            prop_assert_eq!(RedirectSpec::from_json(&spec.to_json()), Ok(spec.clone()));
            prop_assert!(Plan::new(&spec).is_ok(), "{}", text);
        }
        if let Ok(spec) = RedirectSpec::parse(&text) {
            prop_assert_eq!(spec.validate(), Ok(()));
        }
        let _ = RedirectSpec::from_yaml(&text);
    }

    /// Any JSON-ish text is refused or accepted as a capture spec that
    /// validates and reads back equal from its own `to_json`.
    #[test]
    fn capture_spec_any_json_is_refused_or_round_trips(text in json_ish(CAPTURE_FIELDS)) {
        if let Ok(spec) = CaptureSpec::from_json(&text) {
            prop_assert_eq!(spec.validate(), Ok(()));
            prop_assert_eq!(CaptureSpec::from_json(&spec.to_json()), Ok(spec));
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A valid redirect spec serialised with `to_json` parses back equal
    /// (also through `parse`, which tells JSON from YAML), its plan builds
    /// without panicking, and normalising it (sorting, de-duplicating,
    /// truncating prefixes) changes neither its validity nor its plan.
    #[test]
    fn redirect_spec_valid_round_trips_and_plans(spec in valid_redirect_spec()) {
        let json = spec.to_json();
        prop_assert_eq!(RedirectSpec::from_json(&json), Ok(spec.clone()));
        prop_assert_eq!(RedirectSpec::parse(&json), Ok(spec.clone()));
        let plan = Plan::new(&spec).map_err(|e| TestCaseError::fail(format!("{json}: {e}")))?;
        prop_assert_eq!(plan.ipv6, spec.ipv6);
        let normal = spec.normalized();
        prop_assert_eq!(normal.validate(), Ok(()));
        prop_assert_eq!(&normal.normalized(), &normal);
        prop_assert_eq!(Plan::new(&normal), Ok(plan));
    }

    /// A valid redirect spec written as YAML (a spec file) reads back equal.
    #[test]
    fn redirect_spec_valid_round_trips_through_yaml(spec in valid_redirect_spec()) {
        let yaml = serde_norway::to_string(&spec).expect("serialises");
        prop_assert_eq!(RedirectSpec::from_yaml(&yaml), Ok(spec.clone()), "{}", yaml);
        prop_assert_eq!(RedirectSpec::parse(&yaml), Ok(spec));
    }

    /// A valid capture spec serialised with `to_json` parses back equal; its
    /// plan for any valid interface, non-zero mark and set of families
    /// builds, captures only the connection's families (one capture jump per
    /// CIDR of theirs, no IPv6 rule without IPv6), and mark 0 is refused.
    #[test]
    fn capture_spec_valid_round_trips_and_plans(
        spec in valid_capture_spec(),
        iface in interface(),
        mark in 1..=u32::MAX,
        families in prop::sample::subsequence(vec![Family::V4, Family::V6], 0..=2),
    ) {
        prop_assert_eq!(spec.validate(), Ok(()));
        prop_assert_eq!(CaptureSpec::from_json(&spec.to_json()), Ok(spec.clone()));
        let plan = Plan::capture(&spec, &iface, mark, &families)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(plan.ipv6, families.contains(&Family::V6));
        // Capture starts only for the connection's families, one jump per such CIDR.
        let jumps: Vec<_> = plan
            .rules
            .iter()
            .filter(|r| r.action == Action::Jump(OwnChain::Capture))
            .collect();
        for rule in &jumps {
            prop_assert!(rule.family.is_some_and(|f| families.contains(&f)), "{:?}", rule);
        }
        let wanted = spec.cidrs.iter().filter(|n| families.contains(&Family::of(n))).count();
        prop_assert_eq!(jumps.len(), wanted);
        if !plan.ipv6 {
            prop_assert!(plan.rules.iter().all(|r| r.family != Some(Family::V6)));
        }
        prop_assert!(Plan::capture(&spec, &iface, 0, &families).is_err(), "mark 0 accepted");
    }

    /// Port ranges: any text is refused or is a range 1 ≤ lo ≤ hi that its
    /// own `Display` writes back; no panic.
    #[test]
    fn port_range_any_text_parses_or_is_refused(
        s in prop_oneof![
            "[0-9 +-]{0,12}",
            "[0-9]{1,6}-[0-9]{1,6}",
            any::<String>(),
        ],
    ) {
        if let Ok(r) = s.parse::<PortRange>() {
            prop_assert!(1 <= r.lo && r.lo <= r.hi, "{} gave {:?}", s, r);
            prop_assert_eq!(r.to_string().parse::<PortRange>(), Ok(r));
        }
    }

    /// Every valid range is written as `lo` or `lo-hi` and reads back, also
    /// with blanks around its parts; an inverted range, port 0 or a port past
    /// 65535 is refused.
    #[test]
    fn port_range_valid_round_trips_and_bad_ones_are_refused(
        a in 1..=u16::MAX,
        b in 1..=u16::MAX,
        big in 65536..=u32::MAX,
    ) {
        let r = PortRange { lo: a.min(b), hi: a.max(b) };
        let shown = r.to_string();
        let canonical = if r.lo == r.hi { r.lo.to_string() } else { format!("{}-{}", r.lo, r.hi) };
        prop_assert_eq!(&shown, &canonical);
        prop_assert_eq!(shown.parse::<PortRange>(), Ok(r));
        prop_assert_eq!(format!(" {} - {} ", r.lo, r.hi).parse::<PortRange>(), Ok(r));
        let inverted = format!("{}-{}", r.hi, r.lo);
        prop_assert_eq!(inverted.parse::<PortRange>().is_err(), a != b);
        for bad in [format!("0-{b}"), "0".to_owned(), big.to_string(), format!("{a}-{big}")] {
            prop_assert!(bad.parse::<PortRange>().is_err(), "{:?} accepted", bad);
        }
    }
}

// ---------------------------------------------------------------- hop

/// Strings a policy route field may hold: NSM's forms, near misses, anything.
fn policy_text(tokens: Vec<&'static str>) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(tokens).prop_map(str::to_owned),
        1 => "[0-9a-f:./ -]{0,12}",
        1 => prop::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter),
    ]
}

fn route() -> impl Strategy<Value = Route> {
    let prefix = prop_oneof![
        3 => any_net().prop_map(|n| n.to_string()),
        2 => policy_text(vec![
            "", "0.0.0.0/0", "::/0", "198.19.0.0/16", "10.1.2.3/8", "fd00::/8", "1.2.3.4", "x",
            "10.0.0.0/33",
        ]),
    ];
    let next_hop = policy_text(vec![
        "",
        "",
        "198.18.0.0",
        "fd00::",
        "0.0.0.0",
        "::",
        "255.255.255.255",
        "224.0.0.1",
        "bad",
    ]);
    (prefix, next_hop).prop_map(|(prefix, next_hop)| Route { prefix, next_hop })
}

fn policy_route() -> impl Strategy<Value = PolicyRoute> {
    let routes = prop_oneof![
        20 => prop::collection::vec(route(), 0..5),
        // More routes than a connection may carry.
        1 => Just(vec![Route::default(); MAX_POLICY_ROUTES + 1]),
    ];
    (
        policy_text(vec![
            "",
            " ",
            "198.18.0.1/32",
            "198.18.0.1/24",
            "fd00::1/128",
            "banana",
            "0.0.0.0/0",
        ]),
        policy_text(vec!["", "6", "17", "132", " 6 ", "1", "256", "tcp", "-1"]),
        policy_text(vec![
            "",
            "80",
            "8000-8999",
            "90-80",
            "0",
            "1-65535",
            "65536",
            "-",
            "80-",
        ]),
        policy_text(vec!["", "53", "1-1024", "0-1"]),
        routes,
    )
        .prop_map(|(from, proto, dst_port, src_port, routes)| PolicyRoute {
            from,
            proto,
            dst_port,
            src_port,
            routes,
        })
}

/// An address a link may have or a route may go via.
fn unicast(v6: bool) -> impl Strategy<Value = std::net::IpAddr> {
    net(v6).prop_map(|n| n.addr()).prop_filter("unicast", |a| {
        !(a.is_unspecified() || a.is_multicast() || a.is_loopback())
            && *a != std::net::Ipv4Addr::BROADCAST
    })
}

fn good_route(v6: bool) -> impl Strategy<Value = Route> {
    (net(v6), prop::option::of(unicast(v6))).prop_map(|(n, gw)| Route {
        prefix: n.to_string(),
        next_hop: gw.map(|g| g.to_string()).unwrap_or_default(),
    })
}

/// A policy route as NSM's forwarders take it: one family throughout,
/// ports only with a protocol that has them.
fn good_policy_route() -> impl Strategy<Value = PolicyRoute> {
    let range = || {
        prop::option::of(port_range().prop_map(|r| r.to_string()))
            .prop_map(Option::unwrap_or_default)
    };
    any::<bool>()
        .prop_flat_map(move |v6| {
            (
                prop::option::of(net(v6).prop_map(|n| n.to_string())),
                prop::sample::select(vec!["", "6", "17", "132", " 6 ", "1", "47"]),
                range(),
                range(),
                // The default route NSM adds to a policy without routes is IPv4.
                prop::collection::vec(good_route(v6), if v6 { 1..4 } else { 0..4 }),
            )
        })
        .prop_map(|(from, proto, dst_port, src_port, routes)| {
            let ports = matches!(proto.trim(), "6" | "17" | "132");
            PolicyRoute {
                from: from.unwrap_or_default(),
                proto: proto.to_owned(),
                dst_port: if ports { dst_port } else { String::new() },
                src_port: if ports { src_port } else { String::new() },
                routes,
            }
        })
}

fn addresses() -> impl Strategy<Value = Vec<String>> {
    let wild = prop_oneof![
        3 => prop::sample::select(vec![
            "198.18.0.1/32", "198.18.0.0/32", "fd00::1/128", "10.0.0.1/24", "0.0.0.0/0",
            "224.0.0.1/32", "198.18.0.1", "x",
        ])
        .prop_map(str::to_owned),
        2 => any_net().prop_map(|n| n.to_string()),
        1 => "\\PC{0,8}",
    ];
    let good = any::<bool>()
        .prop_flat_map(|v6| (unicast(v6), if v6 { 64..=128u8 } else { 16..=32u8 }))
        .prop_map(|(a, len)| format!("{a}/{len}"));
    prop_oneof![
        3 => prop::collection::vec(good, 1..3),
        1 => prop::collection::vec(wild, 0..4),
    ]
}

/// A returned connection as an endpoint (or anything posing as one) sends it.
fn returned_connection() -> impl Strategy<Value = Connection> {
    let extra_value = |key: &'static str, specs: BoxedStrategy<String>| {
        prop::option::of((
            Just(key.to_owned()),
            prop_oneof![
                2 => specs,
                1 => prop::sample::select(vec!["", " ", "\n\t", "{}", "null"])
                    .prop_map(str::to_owned),
            ],
        ))
    };
    let capture = prop_oneof![
        valid_capture_spec().prop_map(|s| s.to_json()),
        json_ish(CAPTURE_FIELDS),
    ]
    .boxed();
    let redirect = prop_oneof![
        valid_redirect_spec().prop_map(|s| s.to_json()),
        json_ish(REDIRECT_FIELDS),
    ]
    .boxed();
    let routes = || {
        prop_oneof![
            3 => any::<bool>().prop_flat_map(|v6| prop::collection::vec(good_route(v6), 0..4)),
            1 => prop::collection::vec(route(), 0..4),
        ]
    };
    let policies = prop_oneof![
        3 => prop::collection::vec(good_policy_route(), 0..4),
        1 => prop::collection::vec(
            prop_oneof![good_policy_route(), policy_route()],
            0..(MAX_POLICIES + 3),
        ),
    ];
    let ip = (addresses(), addresses(), routes(), routes(), policies).prop_map(
        |(src_ip_addrs, dst_ip_addrs, src_routes, dst_routes, policies)| IpContext {
            src_ip_addrs,
            dst_ip_addrs,
            src_routes,
            dst_routes,
            policies,
            ..IpContext::default()
        },
    );
    let context = (
        prop::option::weighted(0.9, ip),
        extra_value(CLIENT_CAPTURE_KEY, capture),
        extra_value(CLIENT_REDIRECT_KEY, redirect),
        prop_oneof![2 => Just(0u32), 2 => 1280..=9000u32, 1 => any::<u32>()],
    )
        .prop_map(|(ip_context, capture, redirect, mtu)| ConnectionContext {
            ip_context,
            extra_context: capture
                .into_iter()
                .chain(redirect)
                .collect::<HashMap<_, _>>(),
            mtu,
            ..ConnectionContext::default()
        });
    prop::option::weighted(0.95, context).prop_map(|context| Connection {
        id: "conn-1".into(),
        context,
        ..Connection::default()
    })
}

fn extra<'a>(c: &'a Connection, key: &str) -> Option<&'a str> {
    c.context
        .as_ref()?
        .extra_context
        .get(key)
        .map(String::as_str)
}

proptest! {
    #![proptest_config(config(256))]

    /// `policies` reads any returned connection without panicking. Accepted
    /// policies are at most MAX_POLICIES, one per policy route, each with
    /// routes (NSM's default when it listed none), ports only with TCP, UDP
    /// or SCTP, valid ranges, and `from` a network of the routes' family.
    #[test]
    fn hop_policies_convert_or_refuse_any_connection(conn in returned_connection()) {
        let list: &[PolicyRoute] = conn
            .context
            .as_ref()
            .and_then(|c| c.ip_context.as_ref())
            .map(|ip| ip.policies.as_slice())
            .unwrap_or_default();
        let total: usize = list.iter().map(|p| p.routes.len()).sum();
        match policies(&conn) {
            Ok(ps) => {
                prop_assert!(list.len() <= MAX_POLICIES && total <= MAX_POLICY_ROUTES);
                prop_assert_eq!(ps.len(), list.len());
                for (p, raw) in ps.iter().zip(list) {
                    prop_assert_eq!(p.routes.len(), raw.routes.len().max(1));
                    prop_assert_eq!(p.proto, raw.proto.trim().parse::<u8>().ok());
                    for (lo, hi) in [p.sport, p.dport].into_iter().flatten() {
                        prop_assert!(1 <= lo && lo <= hi);
                        prop_assert!(matches!(p.proto, Some(6 | 17 | 132)), "{:?}", p);
                    }
                    for r in &p.routes {
                        prop_assert_eq!(r.dst, r.dst.trunc());
                        prop_assert!(r.validate().is_ok(), "{:?}", r);
                    }
                    if let Some(from) = p.from {
                        prop_assert_eq!(from, from.trunc());
                        let v6 = from.addr().is_ipv6();
                        prop_assert!(p.routes.iter().all(|r| r.dst.addr().is_ipv6() == v6));
                    }
                }
            }
            Err(e) => {
                prop_assert!(!list.is_empty());
                prop_assert!(!e.to_string().is_empty());
            }
        }
        if list.len() > MAX_POLICIES || total > MAX_POLICY_ROUTES {
            prop_assert!(policies(&conn).is_err());
        }
    }

    /// The client-capture key: absent or blank asks for nothing; otherwise
    /// the hop takes exactly what `CaptureSpec::from_json` takes.
    #[test]
    fn hop_client_capture_is_the_capture_spec_or_nothing(conn in returned_connection()) {
        let got = client_capture(&conn);
        match extra(&conn, CLIENT_CAPTURE_KEY).filter(|t| !t.trim().is_empty()) {
            None => prop_assert!(matches!(got, Ok(None))),
            Some(text) => match CaptureSpec::from_json(text) {
                Ok(spec) => prop_assert_eq!(got.ok(), Some(Some(spec))),
                Err(_) => prop_assert!(got.is_err()),
            },
        }
    }

    /// The client-redirect key: absent or blank asks for nothing; a spec
    /// the hop takes is what `RedirectSpec::from_json` reads and its plan
    /// builds; what `from_json` refuses, the hop refuses.
    #[test]
    fn hop_client_redirect_is_a_plannable_spec_or_nothing(conn in returned_connection()) {
        let got = client_redirect(&conn);
        match extra(&conn, CLIENT_REDIRECT_KEY).filter(|t| !t.trim().is_empty()) {
            None => prop_assert!(matches!(got, Ok(None))),
            Some(text) => match got {
                Ok(Some(spec)) => {
                    prop_assert_eq!(RedirectSpec::from_json(text), Ok(spec.clone()));
                    prop_assert!(Plan::new(&spec).is_ok());
                }
                Ok(None) => return Err(TestCaseError::fail(format!("{text:?} ignored"))),
                Err(_) => {
                    let planned = RedirectSpec::from_json(text).and_then(|s| Plan::new(&s));
                    prop_assert!(planned.is_err());
                }
            },
        }
    }

    /// The veth plan of any returned connection is built or refused without
    /// panicking; a built one validates, holds the connection's addresses in
    /// order and its MTU (1500 when unset).
    #[test]
    fn hop_veth_plan_converts_or_refuses_any_connection(conn in returned_connection()) {
        let ends = Ends {
            client_netns: NetnsId { dev: 4, ino: 100 },
            endpoint_netns: NetnsId { dev: 4, ino: 200 },
            client_if: "nsm-1",
            endpoint_if: "mesh-proxy-x",
        };
        let ip = conn.context.as_ref().and_then(|c| c.ip_context.as_ref());
        match veth_plan(ends, &conn) {
            Ok(plan) => {
                let ip = ip.expect("a plan without ip_context");
                prop_assert!(plan.validate().is_ok());
                let parsed = |l: &[String]| {
                    l.iter().map(|s| s.parse::<IpNet>().ok()).collect::<Option<Vec<_>>>()
                };
                prop_assert_eq!(Some(plan.a.addresses.clone()), parsed(&ip.src_ip_addrs));
                prop_assert_eq!(Some(plan.b.addresses.clone()), parsed(&ip.dst_ip_addrs));
                prop_assert_eq!(plan.a.routes.len(), ip.src_routes.len());
                prop_assert_eq!(plan.b.routes.len(), ip.dst_routes.len());
                let mtu = conn.context.as_ref().map_or(0, |c| c.mtu);
                prop_assert_eq!(plan.mtu, Some(if mtu == 0 { DEFAULT_MTU } else { mtu }));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        if ip.is_none_or(|ip| ip.src_ip_addrs.is_empty() || ip.dst_ip_addrs.is_empty()) {
            prop_assert!(veth_plan(ends, &conn).is_err());
        }
    }
}
