//! Property tests of what the endpoint parses from callers: every gRPC
//! Request goes through `validate` (request → the chain's `Req`), and the
//! client's `proxy-*` labels through `Overrides::from_labels`. Arbitrary
//! input never panics, is converted or refused, and what is accepted is
//! what was asked for. Bounded case counts; no failure files are written.

use std::collections::HashMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nse::mesh_proxy::config::Placement;
use nse::mesh_proxy::labels::{
    ALL, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_CIDRS, EXCLUDE_OUTBOUND_PORTS, Overrides,
    PLACEMENT, PREFIX,
};
use nse::validate;
use nsm_api::connection::{Connection, Mechanism, MonitorScopeSelector, Path, PathSegment};
use nsm_api::connectioncontext::{
    ConnectionContext, DnsConfig, DnsContext, EthernetContext, IpContext, IpNeighbor, PolicyRoute,
    Route,
};
use nsm_api::contract::redirect::Port;
use nsm_api::networkservice::NetworkServiceRequest;
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- labels

/// Label names: ours (known and unknown), look-alikes that are not ours, NSM's.
fn label_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(ALL.to_vec()).prop_map(str::to_owned),
        2 => "[a-z-]{0,10}".prop_map(|s| format!("{PREFIX}{s}")),
        1 => prop::sample::select(vec![
            "proxy",
            "Proxy-placement",
            "xproxy-placement",
            " proxy-placement",
            "podName",
            "nodeName",
            "app",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,8}",
    ]
}

fn separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![",", ";", " ", "\t", ", ", " ;", ",,", "\u{a0}", "\n"])
}

fn separators() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(separator(), 1..3)
}

/// A list value from `items`, joined by arbitrary separators (also leading and trailing ones).
fn joined(items: Vec<String>, seps: Vec<&'static str>) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        out.push_str(seps[i % seps.len()]);
        out.push_str(item);
    }
    if items.len() % 2 == 1 {
        out.push_str(seps[0]);
    }
    out
}

fn v4_net() -> impl Strategy<Value = IpNet> {
    (any::<u32>(), 0..=32u8)
        .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a.into(), l).expect("prefix length")))
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0..=128u8)
        .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a.into(), l).expect("prefix length")))
}

fn any_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![v4_net(), v6_net()]
}

/// Label values: valid and broken lists of ports and CIDRs, placements, anything.
fn label_value() -> impl Strategy<Value = String> {
    let port = prop_oneof![
        (0..=70000u32).prop_map(|p| p.to_string()),
        prop::sample::select(vec!["http", "-1", "+22", "0x16", "22-80", "*"])
            .prop_map(str::to_owned),
    ];
    let cidr = prop_oneof![
        any_net().prop_map(|n| n.to_string()),
        any_net().prop_map(|n| n.addr().to_string()),
        prop::sample::select(vec!["10.0.0.0/33", "fd00::/129", "x", "*", "1.2.3", "::/"])
            .prop_map(str::to_owned),
    ];
    prop_oneof![
        2 => prop::sample::select(vec!["proxy", "sidecar", " sidecar ", "Sidecar", "inline", ""])
            .prop_map(str::to_owned),
        2 => (prop::collection::vec(port, 0..5), separators()).prop_map(|(i, s)| joined(i, s)),
        2 => (prop::collection::vec(cidr, 0..5), separators()).prop_map(|(i, s)| joined(i, s)),
        1 => any::<String>(),
        1 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
    ]
}

fn label_map() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map(label_name(), label_value(), 0..8)
}

fn ours(labels: &HashMap<String, String>) -> HashMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What a client may validly ask for, written down as labels.
#[derive(Debug, Clone)]
struct Asked {
    placement: Option<Placement>,
    cidrs: Vec<IpNet>,
    /// Write a host prefix as a bare address.
    bare: Vec<bool>,
    out_ports: Vec<u16>,
    in_ports: Vec<u16>,
    seps: Vec<&'static str>,
    others: HashMap<String, String>,
}

fn asked() -> impl Strategy<Value = Asked> {
    (
        prop::option::of(prop::sample::select(vec![
            Placement::Proxy,
            Placement::Sidecar,
        ])),
        prop::collection::vec(any_net(), 0..5),
        prop::collection::vec(any::<bool>(), 5),
        prop::collection::vec(1..=u16::MAX, 0..5),
        prop::collection::vec(1..=u16::MAX, 0..5),
        prop::collection::vec(separator(), 1..4),
        prop::collection::hash_map("[a-zA-Z]{1,8}", label_value(), 0..4),
    )
        .prop_map(
            |(placement, cidrs, bare, out_ports, in_ports, seps, others)| Asked {
                placement,
                cidrs,
                bare,
                out_ports,
                in_ports,
                seps,
                others,
            },
        )
}

impl Asked {
    fn labels(&self) -> HashMap<String, String> {
        let mut m = self.others.clone();
        if let Some(p) = self.placement {
            m.insert(PLACEMENT.into(), p.to_string());
        }
        let cidrs = self
            .cidrs
            .iter()
            .zip(&self.bare)
            .map(|(n, bare)| {
                if *bare && n.prefix_len() == n.max_prefix_len() {
                    n.addr().to_string()
                } else {
                    n.to_string()
                }
            })
            .collect();
        m.insert(
            EXCLUDE_OUTBOUND_CIDRS.into(),
            joined(cidrs, self.seps.clone()),
        );
        let ports = |p: &[u16]| joined(p.iter().map(u16::to_string).collect(), self.seps.clone());
        m.insert(EXCLUDE_OUTBOUND_PORTS.into(), ports(&self.out_ports));
        m.insert(EXCLUDE_INBOUND_PORTS.into(), ports(&self.in_ports));
        m
    }

    fn overrides(&self) -> Overrides {
        Overrides {
            placement: self.placement,
            // Prefixes are kept as networks (host bits dropped), as the config file does.
            exclude_outbound_cidrs: self.cidrs.iter().map(IpNet::trunc).collect(),
            exclude_outbound_ports: self.out_ports.iter().copied().map(Port).collect(),
            exclude_inbound_ports: self.in_ports.iter().copied().map(Port).collect(),
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Any label map is read or refused without panicking; a refusal names a
    /// `proxy-*` label of the map, in the documented `label "<name>": <why>`
    /// form.
    #[test]
    fn labels_errors_name_one_of_our_labels(labels in label_map()) {
        if let Err(e) = Overrides::from_labels(&labels) {
            prop_assert!(e.label.starts_with(PREFIX), "{:?}", e);
            prop_assert!(labels.contains_key(&e.label), "{:?} is not in the map", e.label);
            let text = e.to_string();
            let head = format!("label {:?}: ", e.label);
            prop_assert!(text.starts_with(&head), "{}", text);
        }
    }

    /// Labels without the `proxy-` prefix (NSM's `podName`, the client's
    /// own) never change the outcome: the result is that of our labels alone,
    /// and a map without any of ours asks for nothing.
    #[test]
    fn labels_without_our_prefix_never_matter(labels in label_map()) {
        let mine = ours(&labels);
        prop_assert_eq!(Overrides::from_labels(&labels), Overrides::from_labels(&mine));
        let theirs: HashMap<String, String> =
            labels.into_iter().filter(|(k, _)| !k.starts_with(PREFIX)).collect();
        prop_assert_eq!(Overrides::from_labels(&theirs), Ok(Overrides::default()));
    }

    /// The reported label is the first bad one by name: our labels sorting
    /// before it are fine together, and it is refused on its own.
    #[test]
    fn labels_report_the_first_bad_one(labels in label_map()) {
        if let Err(e) = Overrides::from_labels(&labels) {
            let before: HashMap<String, String> = ours(&labels)
                .into_iter()
                .filter(|(k, _)| *k < e.label)
                .collect();
            prop_assert!(Overrides::from_labels(&before).is_ok(), "{:?} fails too", before);
            let alone = HashMap::from([(e.label.clone(), labels[&e.label].clone())]);
            let refused = Overrides::from_labels(&alone).map_err(|e| e.label);
            prop_assert_eq!(refused, Err(e.label.clone()));
        }
    }

    /// A valid ask, written with any of the documented separators (`,`, `;`,
    /// whitespace, also doubled, leading or trailing) and next to anyone
    /// else's labels, reads back as exactly that ask.
    #[test]
    fn labels_valid_asks_read_back(a in asked()) {
        prop_assert_eq!(Overrides::from_labels(&a.labels()), Ok(a.overrides()));
    }
}

// ---------------------------------------------------------------- requests

/// Strings of either flavour: `clean` ones are short and printable (what
/// every hop accepts); wild ones hold control characters, any Unicode, and
/// sometimes are long.
fn string(clean: bool) -> BoxedStrategy<String> {
    if clean {
        prop_oneof![
            3 => "[a-zA-Z0-9._:/@-]{0,16}",
            1 => "\\PC{0,8}",
        ]
        .boxed()
    } else {
        prop_oneof![
            3 => "[a-zA-Z0-9._:/@-]{0,16}",
            2 => prop::collection::vec(any::<char>(), 0..16).prop_map(String::from_iter),
            1 => "[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}a]{1,3}",
            1 => (1..2000usize, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
        ]
        .boxed()
    }
}

/// Size of lists and maps: small when clean, up to past any sane limit
/// (64 entries, 32 segments, 16 preferences) when wild.
fn count(clean: bool) -> std::ops::Range<usize> {
    if clean { 0..5 } else { 0..80 }
}

/// Distinct keys, so a map built from the pairs holds every one of them;
/// `nested`: a map inside a list (kept small, or cases grow quadratic).
fn pairs(clean: bool, nested: bool) -> BoxedStrategy<Vec<(String, String)>> {
    let n = if nested { 0..4 } else { count(clean) };
    prop::collection::btree_map(string(clean), string(clean), n)
        .prop_map(|m| m.into_iter().collect())
        .boxed()
}

/// The strings `validate` promises to check, as a model the tests can edit:
/// maps are lists of distinct keys until they become protos.
#[derive(Debug, Clone)]
struct MechModel {
    cls: String,
    ty: String,
    params: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct SegModel {
    name: String,
    id: String,
    token: String,
    metrics: Vec<(String, String)>,
    expires: Option<prost_types::Timestamp>,
}

#[derive(Debug, Clone)]
struct ConnModel {
    id: String,
    network_service: String,
    endpoint: String,
    payload: String,
    labels: Vec<(String, String)>,
    mechanism: Option<MechModel>,
    path: Option<(u32, Vec<SegModel>)>,
    extra_context: Option<Vec<(String, String)>>,
    /// Everything of the context `validate` does not look into.
    context: ConnectionContext,
    state: i32,
}

#[derive(Debug, Clone)]
struct ReqModel {
    conn: Option<ConnModel>,
    prefs: Vec<MechModel>,
}

fn map_of(pairs: &[(String, String)]) -> HashMap<String, String> {
    pairs.iter().cloned().collect()
}

impl MechModel {
    fn proto(&self) -> Mechanism {
        Mechanism {
            cls: self.cls.clone(),
            r#type: self.ty.clone(),
            parameters: map_of(&self.params),
        }
    }

    fn strings(&mut self) -> Vec<&mut String> {
        let mut v = vec![&mut self.cls, &mut self.ty];
        v.extend(self.params.iter_mut().flat_map(|(k, x)| [k, x]));
        v
    }
}

impl SegModel {
    fn proto(&self) -> PathSegment {
        PathSegment {
            name: self.name.clone(),
            id: self.id.clone(),
            token: self.token.clone(),
            expires: self.expires,
            metrics: map_of(&self.metrics),
        }
    }

    fn strings(&mut self) -> Vec<&mut String> {
        let mut v = vec![&mut self.name, &mut self.id, &mut self.token];
        v.extend(self.metrics.iter_mut().flat_map(|(k, x)| [k, x]));
        v
    }
}

impl ConnModel {
    fn proto(&self) -> Connection {
        let context = self.extra_context.as_ref().map(|extra| ConnectionContext {
            extra_context: map_of(extra),
            ..self.context.clone()
        });
        Connection {
            id: self.id.clone(),
            network_service: self.network_service.clone(),
            mechanism: self.mechanism.as_ref().map(MechModel::proto),
            context,
            labels: map_of(&self.labels),
            path: self.path.as_ref().map(|(index, segs)| Path {
                index: *index,
                path_segments: segs.iter().map(SegModel::proto).collect(),
            }),
            network_service_endpoint_name: self.endpoint.clone(),
            payload: self.payload.clone(),
            state: self.state,
        }
    }

    fn strings(&mut self) -> Vec<&mut String> {
        let mut v = vec![
            &mut self.id,
            &mut self.network_service,
            &mut self.endpoint,
            &mut self.payload,
        ];
        v.extend(self.labels.iter_mut().flat_map(|(k, x)| [k, x]));
        if let Some(m) = &mut self.mechanism {
            v.extend(m.strings());
        }
        if let Some((_, segs)) = &mut self.path {
            v.extend(segs.iter_mut().flat_map(SegModel::strings));
        }
        if let Some(extra) = &mut self.extra_context {
            v.extend(extra.iter_mut().flat_map(|(k, x)| [k, x]));
        }
        v
    }
}

impl ReqModel {
    fn proto(&self) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: self.conn.as_ref().map(ConnModel::proto),
            mechanism_preferences: self.prefs.iter().map(MechModel::proto).collect(),
        }
    }

    /// Every string `validate` checks, in a fixed order.
    fn strings(&mut self) -> Vec<&mut String> {
        let mut v = Vec::new();
        if let Some(c) = &mut self.conn {
            v.extend(c.strings());
        }
        v.extend(self.prefs.iter_mut().flat_map(MechModel::strings));
        v
    }
}

fn mech(clean: bool, nested: bool) -> impl Strategy<Value = MechModel> {
    (string(clean), string(clean), pairs(clean, nested)).prop_map(|(cls, ty, params)| MechModel {
        cls,
        ty,
        params,
    })
}

fn segment(clean: bool) -> impl Strategy<Value = SegModel> {
    let expires = prop::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    );
    (
        string(clean),
        string(clean),
        string(clean),
        pairs(clean, true),
        expires,
    )
        .prop_map(|(name, id, token, metrics, expires)| SegModel {
            name,
            id,
            token,
            metrics,
            expires,
        })
}

/// Strings `validate` leaves to the elements that own them (addresses,
/// routes, DNS): wild in any request.
fn unchecked_context(clean: bool) -> impl Strategy<Value = ConnectionContext> {
    let list = move || {
        // Wild: sometimes longer than any list NSM would send.
        let long = if clean { 0 } else { 1 };
        prop_oneof![
            8 => prop::collection::vec(string(false), count(clean)),
            long => Just(vec![String::new(); 4097]),
        ]
    };
    let route =
        (string(false), string(false)).prop_map(|(prefix, next_hop)| Route { prefix, next_hop });
    let routes = move || prop::collection::vec(route.clone(), 0..4);
    let policy = (
        string(false),
        string(false),
        string(false),
        string(false),
        routes(),
    )
        .prop_map(|(from, proto, dst_port, src_port, routes)| PolicyRoute {
            from,
            proto,
            dst_port,
            src_port,
            routes,
        });
    let ip = (
        list(),
        list(),
        any::<(bool, bool)>(),
        routes(),
        list(),
        prop::collection::vec((string(false), string(false)), 0..3),
        prop::collection::vec(policy, 0..4),
    )
        .prop_map(
            |(src, dst, (sreq, dreq), routes, excluded, neigh, policies)| IpContext {
                src_ip_addrs: src,
                dst_ip_addrs: dst,
                src_ip_required: sreq,
                dst_ip_required: dreq,
                src_routes: routes.clone(),
                dst_routes: routes,
                excluded_prefixes: excluded,
                ip_neighbors: neigh
                    .into_iter()
                    .map(|(ip, hardware_address)| IpNeighbor {
                        ip,
                        hardware_address,
                    })
                    .collect(),
                extra_prefix_request: Vec::new(),
                extra_prefixes: Vec::new(),
                policies,
            },
        );
    let dns = prop::collection::vec(
        (
            prop::collection::vec(string(false), 0..3),
            prop::collection::vec(string(false), 0..3),
        ),
        0..3,
    )
    .prop_map(|cs| DnsContext {
        configs: cs
            .into_iter()
            .map(|(dns_server_ips, search_domains)| DnsConfig {
                dns_server_ips,
                search_domains,
            })
            .collect(),
    });
    let eth =
        (string(false), string(false), any::<i32>()).prop_map(|(src_mac, dst_mac, vlan_tag)| {
            EthernetContext {
                src_mac,
                dst_mac,
                vlan_tag,
            }
        });
    (
        prop::option::of(ip),
        prop::option::of(dns),
        prop::option::of(eth),
        any::<u32>(),
    )
        .prop_map(
            |(ip_context, dns_context, ethernet_context, mtu)| ConnectionContext {
                ip_context,
                dns_context,
                ethernet_context,
                extra_context: HashMap::new(),
                mtu,
            },
        )
}

fn connection(clean: bool) -> impl Strategy<Value = ConnModel> {
    let segs = prop::collection::vec(segment(clean), if clean { 0..5 } else { 0..40 });
    (
        (string(clean), string(clean), string(clean), string(clean)),
        pairs(clean, false),
        prop::option::of(mech(clean, false)),
        prop::option::of((any::<u32>(), segs)),
        prop::option::of(pairs(clean, false)),
        unchecked_context(clean),
        any::<i32>(),
    )
        .prop_map(
            |(
                (id, network_service, endpoint, payload),
                labels,
                mechanism,
                path,
                extra_context,
                context,
                state,
            )| {
                ConnModel {
                    id,
                    network_service,
                    endpoint,
                    payload,
                    labels,
                    mechanism,
                    path,
                    extra_context,
                    context,
                    state,
                }
            },
        )
}

fn request(clean: bool) -> impl Strategy<Value = ReqModel> {
    let conn = if clean {
        connection(true).prop_map(Some).boxed()
    } else {
        prop::option::weighted(0.9, connection(false)).boxed()
    };
    let prefs = prop::collection::vec(mech(clean, true), if clean { 0..5 } else { 0..24 });
    (conn, prefs).prop_map(|(conn, prefs)| ReqModel { conn, prefs })
}

/// A clean request with a non-empty connection id: what every hop accepts.
fn good_request() -> impl Strategy<Value = ReqModel> {
    (request(true), "[a-z0-9-]{1,16}").prop_map(|(mut r, id)| {
        if let Some(c) = &mut r.conn {
            c.id = id;
        }
        r
    })
}

/// The checked strings of a request as protos carry them.
fn checked(r: &NetworkServiceRequest) -> Vec<String> {
    let mut v = Vec::new();
    let map = |v: &mut Vec<String>, m: &HashMap<String, String>| {
        v.extend(m.iter().flat_map(|(k, x)| [k.clone(), x.clone()]));
    };
    let mech = |v: &mut Vec<String>, m: &Mechanism| {
        v.push(m.cls.clone());
        v.push(m.r#type.clone());
        map(v, &m.parameters);
    };
    if let Some(c) = &r.connection {
        v.extend([
            c.id.clone(),
            c.network_service.clone(),
            c.network_service_endpoint_name.clone(),
            c.payload.clone(),
        ]);
        map(&mut v, &c.labels);
        if let Some(m) = &c.mechanism {
            mech(&mut v, m);
        }
        for s in c.path.iter().flat_map(|p| &p.path_segments) {
            v.extend([s.name.clone(), s.id.clone(), s.token.clone()]);
            map(&mut v, &s.metrics);
        }
        if let Some(ctx) = &c.context {
            map(&mut v, &ctx.extra_context);
        }
    }
    for m in &r.mechanism_preferences {
        mech(&mut v, m);
    }
    v
}

/// `U+XXXX` as the error names a control character.
fn code_in(message: &str) -> Option<u32> {
    let at = message.find("control character U+")? + "control character U+".len();
    let hex: String = message[at..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    u32::from_str_radix(&hex, 16).ok()
}

proptest! {
    #![proptest_config(config(256))]

    /// Any Request — random strings with control characters, absent and
    /// present nested messages, out-of-range enum values and timestamps,
    /// long lists and maps — is converted or refused without panicking. A
    /// converted one is the request itself (connection and preferences
    /// unchanged) with a non-empty id and no control character in any
    /// checked string. One without a connection or with an empty id is
    /// refused, and a refusal naming a control character names one that is
    /// really in a checked string.
    #[test]
    fn validate_request_converts_or_refuses_anything(m in request(false)) {
        let r = m.proto();
        match validate::request(r.clone()) {
            Ok(req) => {
                let conn = r.connection.clone().expect("accepted without a connection");
                prop_assert!(!conn.id.is_empty());
                prop_assert_eq!(&req.conn, &conn);
                prop_assert_eq!(&req.preferences, &r.mechanism_preferences);
                for s in checked(&r) {
                    prop_assert!(!s.chars().any(char::is_control), "accepted {:?}", s);
                }
                prop_assert_eq!(validate::connection(&conn), Ok(()));
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.is_empty());
                if let Some(code) = code_in(&text) {
                    let c = char::from_u32(code).expect("a char");
                    prop_assert!(c.is_control(), "{}", text);
                    let there = checked(&r).iter().any(|s| s.contains(c));
                    prop_assert!(there, "{} is not in the request", text);
                }
            }
        }
        if r.connection.as_ref().is_none_or(|c| c.id.is_empty()) {
            prop_assert!(validate::request(r).is_err());
        }
    }

    /// Every clean request with an id is converted, whatever the strings
    /// `validate` leaves to others hold (addresses, routes, DNS with control
    /// characters).
    #[test]
    fn validate_clean_requests_convert(m in good_request()) {
        let r = m.proto();
        let req = validate::request(r.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(Some(req.conn), r.connection);
        prop_assert_eq!(req.preferences, r.mechanism_preferences);
    }

    /// One control character anywhere in a checked string of a clean
    /// request (ids, names, payload, label and parameter keys and values,
    /// path segments, `extra_context`, every mechanism preference) refuses
    /// it, naming that character; an empty id is refused too.
    #[test]
    fn validate_refuses_one_control_character_anywhere(
        m in good_request(),
        slot in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        c in prop_oneof![prop::char::range('\0', '\x1f'), prop::char::range('\x7f', '\u{9f}')],
    ) {
        let mut bad = m.clone();
        let mut strings = bad.strings();
        let target = slot.get_mut(&mut strings);
        let chars: Vec<char> = target.chars().collect();
        let i = at.index(chars.len() + 1);
        **target = chars[..i].iter().chain([c].iter()).chain(&chars[i..]).collect();
        let e = validate::request(bad.proto()).expect_err("accepted a control character");
        prop_assert_eq!(code_in(&e.to_string()), Some(u32::from(c)), "{}", e);

        let mut empty = m;
        if let Some(conn) = &mut empty.conn {
            conn.id.clear();
            prop_assert!(validate::request(empty.proto()).is_err());
            let conn = empty.proto().connection.expect("a connection");
            prop_assert!(validate::connection(&conn).is_err());
        }
    }

}

proptest! {
    // Each case is up to 36 segments of wild strings: fewer cases.
    #![proptest_config(config(128))]

    /// MonitorConnections selectors: any selector is accepted or refused
    /// without panicking; an accepted one has no control character; a clean
    /// small one is accepted.
    #[test]
    fn validate_selector_checks_what_it_promises(
        segs in prop::collection::vec(segment(false), 0..36),
        services in prop::collection::vec(string(false), 0..80),
        clean_segs in prop::collection::vec(segment(true), 0..5),
        clean_services in prop::collection::vec(string(true), 0..5),
    ) {
        let s = MonitorScopeSelector {
            path_segments: segs.iter().map(SegModel::proto).collect(),
            network_services: services,
        };
        if validate::selector(&s).is_ok() {
            let mut all: Vec<String> = s.network_services.clone();
            for mut seg in segs {
                all.extend(seg.strings().into_iter().map(|x| x.clone()));
            }
            for x in all {
                prop_assert!(!x.chars().any(char::is_control), "accepted {:?}", x);
            }
        }
        let clean = MonitorScopeSelector {
            path_segments: clean_segs.iter().map(SegModel::proto).collect(),
            network_services: clean_services,
        };
        prop_assert_eq!(validate::selector(&clean), Ok(()));
    }
}
