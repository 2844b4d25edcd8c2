//! Plan rule → nftables expressions, encoded the way `nft` itself encodes
//! the text of [`crate::rules::render::nft_rule_body`] (compare with
//! `nft --debug=netlink`). Register values: ports and addresses in network
//! order, meta/ct values (marks, uids, states, zones) in host order.

use std::ffi::CString;

use ipnet::IpNet;
use libc::{
    NFT_CMP_EQ, NFT_CMP_NEQ, NFT_CT_MARK, NFT_CT_STATE, NFT_CT_ZONE, NFT_JUMP, NFT_META_IIFNAME,
    NFT_META_L4PROTO, NFT_META_MARK, NFT_META_NFPROTO, NFT_META_OIFNAME, NFT_META_SKGID,
    NFT_META_SKUID, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER, NFT_REG_1,
    NFT_REG_VERDICT, NFT_RETURN,
};
use nftnl::nftnl_sys as sys;

use super::ffi::{Attr, RawExpr};
use crate::rules::names::{NFT_INTERFACE_SET, nft_chain};
use crate::rules::plan::{Action, ChainId, ChainRef, CtState, Family, L4, Match, Rule};
use crate::rules::spec::Mark;

/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port.
const NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
/// conntrack state bits as nft's `ct state` sees them.
const CT_STATE_INVALID: u32 = 1;
const CT_STATE_ESTABLISHED: u32 = 2;
const CT_STATE_RELATED: u32 = 4;
const CT_STATE_NEW: u32 = 8;
/// `NFT_FIB_RESULT_ADDRTYPE` and `NFTA_FIB_F_DADDR` (linux/netfilter/nf_tables.h).
const FIB_RESULT_ADDRTYPE: u32 = 3;
const FIB_F_DADDR: u32 = 1 << 1;
/// `RTN_UNICAST`: the address type of another host's unicast address.
const RTN_UNICAST: u32 = 1;
/// `RTN_LOCAL`: the address type of an address of this host.
const RTN_LOCAL: u32 = 2;
pub(crate) const IFNAMSIZ: usize = 16;
/// The interface set's id within the transaction that creates it (rules
/// added in that transaction find it by id as well as by name).
pub(crate) const INTERFACE_SET_ID: u32 = 1;

fn e(name: &'static std::ffi::CStr, attrs: Vec<Attr>) -> RawExpr {
    RawExpr { name, attrs }
}

fn reg1() -> u32 {
    NFT_REG_1 as u32
}

fn meta_load(key: i32) -> RawExpr {
    e(
        c"meta",
        vec![
            Attr::U32(sys::NFTNL_EXPR_META_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_META_DREG, reg1()),
        ],
    )
}

fn meta_set(key: i32) -> RawExpr {
    e(
        c"meta",
        vec![
            Attr::U32(sys::NFTNL_EXPR_META_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_META_SREG, reg1()),
        ],
    )
}

fn ct_load(key: i32) -> RawExpr {
    e(
        c"ct",
        vec![
            Attr::U32(sys::NFTNL_EXPR_CT_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_CT_DREG, reg1()),
        ],
    )
}

fn ct_set(key: i32) -> RawExpr {
    e(
        c"ct",
        vec![
            Attr::U32(sys::NFTNL_EXPR_CT_KEY, key as u32),
            Attr::U32(sys::NFTNL_EXPR_CT_SREG, reg1()),
        ],
    )
}

fn cmp(eq: bool, data: &[u8]) -> RawExpr {
    cmp_op(if eq { NFT_CMP_EQ } else { NFT_CMP_NEQ }, data)
}

fn cmp_op(op: i32, data: &[u8]) -> RawExpr {
    e(
        c"cmp",
        vec![
            Attr::U32(sys::NFTNL_EXPR_CMP_SREG, reg1()),
            Attr::U32(sys::NFTNL_EXPR_CMP_OP, op as u32),
            Attr::Bytes(sys::NFTNL_EXPR_CMP_DATA, data.to_vec()),
        ],
    )
}

fn bitwise(mask: &[u8]) -> RawExpr {
    e(
        c"bitwise",
        vec![
            Attr::U32(sys::NFTNL_EXPR_BITWISE_SREG, reg1()),
            Attr::U32(sys::NFTNL_EXPR_BITWISE_DREG, reg1()),
            Attr::U32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32),
            Attr::Bytes(sys::NFTNL_EXPR_BITWISE_MASK, mask.to_vec()),
            Attr::Bytes(sys::NFTNL_EXPR_BITWISE_XOR, vec![0; mask.len()]),
        ],
    )
}

fn payload(base: i32, offset: u32, len: u32) -> RawExpr {
    e(
        c"payload",
        vec![
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_DREG, reg1()),
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_BASE, base as u32),
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset),
            Attr::U32(sys::NFTNL_EXPR_PAYLOAD_LEN, len),
        ],
    )
}

fn immediate(data: &[u8]) -> RawExpr {
    e(
        c"immediate",
        vec![
            Attr::U32(sys::NFTNL_EXPR_IMM_DREG, reg1()),
            Attr::Bytes(sys::NFTNL_EXPR_IMM_DATA, data.to_vec()),
        ],
    )
}

fn verdict(code: i32, chain: Option<String>) -> RawExpr {
    let mut attrs = vec![
        Attr::U32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT as u32),
        Attr::U32(sys::NFTNL_EXPR_IMM_VERDICT, code as u32),
    ];
    if let Some(c) = chain {
        attrs.push(Attr::Str(
            sys::NFTNL_EXPR_IMM_CHAIN,
            CString::new(c).expect("chain names have no NUL"),
        ));
    }
    e(c"immediate", attrs)
}

/// `meta <key> [==|!=] <u32>` in host order.
fn meta_u32(key: i32, eq: bool, v: u32) -> Vec<RawExpr> {
    vec![meta_load(key), cmp(eq, &v.to_ne_bytes())]
}

fn mark_match(m: &Mark, eq: bool) -> Vec<RawExpr> {
    let mut v = vec![meta_load(NFT_META_MARK)];
    if m.mask != u32::MAX {
        v.push(bitwise(&m.mask.to_ne_bytes()));
    }
    v.push(cmp(eq, &m.value.to_ne_bytes()));
    v
}

/// An interface name as nft compares and stores it: the whole zero-padded
/// IFNAMSIZ buffer (names are validated to be shorter).
pub(crate) fn ifname_key(name: &str) -> [u8; IFNAMSIZ] {
    let mut buf = [0u8; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    buf
}

fn ifname(key: i32, name: &str) -> Vec<RawExpr> {
    vec![meta_load(key), cmp(true, &ifname_key(name))]
}

/// `iifname @include_ifaces`: the input interface's name looked up in the
/// interface set.
fn iif_in_set() -> Vec<RawExpr> {
    vec![
        meta_load(NFT_META_IIFNAME),
        e(
            c"lookup",
            vec![
                Attr::U32(sys::NFTNL_EXPR_LOOKUP_SREG, reg1()),
                Attr::Str(
                    sys::NFTNL_EXPR_LOOKUP_SET,
                    CString::new(NFT_INTERFACE_SET).expect("no NUL"),
                ),
                Attr::U32(sys::NFTNL_EXPR_LOOKUP_SET_ID, INTERFACE_SET_ID),
            ],
        ),
    ]
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

/// `ip|ip6 saddr|daddr [!=] prefix`, as nft encodes it: a byte-aligned
/// prefix loads only the bytes it covers; any other loads the whole address
/// and masks it (so `nft list` can still print it as a prefix).
fn addr_match(net: &IpNet, dst: bool, eq: bool) -> Vec<RawExpr> {
    let plen = usize::from(net.prefix_len());
    if plen == 0 {
        return Vec::new();
    }
    let (offset, octets, mask) = match net {
        IpNet::V4(n) => (
            if dst { 16 } else { 12 },
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
        IpNet::V6(n) => (
            if dst { 24 } else { 8 },
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
    };
    if plen % 8 == 0 {
        let nbytes = plen / 8;
        return vec![
            payload(NFT_PAYLOAD_NETWORK_HEADER, offset, nbytes as u32),
            cmp(eq, &octets[..nbytes]),
        ];
    }
    vec![
        payload(NFT_PAYLOAD_NETWORK_HEADER, offset, octets.len() as u32),
        bitwise(&mask),
        cmp(eq, &octets),
    ]
}

fn l4_number(l4: L4) -> u8 {
    match l4 {
        L4::Tcp => libc::IPPROTO_TCP as u8,
        L4::Udp => libc::IPPROTO_UDP as u8,
        L4::Icmp => libc::IPPROTO_ICMP as u8,
        L4::Icmpv6 => libc::IPPROTO_ICMPV6 as u8,
    }
}

fn port_match(offset: u32, eq: bool, port: u16) -> Vec<RawExpr> {
    vec![
        payload(NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2),
        cmp(eq, &port.to_be_bytes()),
    ]
}

/// As nft encodes `sport|dport lo-hi`: two comparisons of the big-endian
/// field, which order like the numbers.
fn port_range(offset: u32, lo: u16, hi: u16) -> Vec<RawExpr> {
    vec![
        payload(NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2),
        cmp_op(libc::NFT_CMP_GTE, &lo.to_be_bytes()),
        cmp_op(libc::NFT_CMP_LTE, &hi.to_be_bytes()),
    ]
}

/// `fib daddr type <addrtype>`.
fn fib_daddr_type(rtn: u32) -> Vec<RawExpr> {
    vec![
        e(
            c"fib",
            vec![
                Attr::U32(sys::NFTNL_EXPR_FIB_DREG, reg1()),
                Attr::U32(sys::NFTNL_EXPR_FIB_RESULT, FIB_RESULT_ADDRTYPE),
                Attr::U32(sys::NFTNL_EXPR_FIB_FLAGS, FIB_F_DADDR),
            ],
        ),
        cmp(true, &rtn.to_ne_bytes()),
    ]
}

/// The expressions of one rule, in evaluation order.
pub(crate) fn rule_exprs(rule: &Rule) -> Vec<RawExpr> {
    let mut x: Vec<RawExpr> = Vec::new();
    if let Some(f) = rule.family {
        x.extend([meta_load(NFT_META_NFPROTO), cmp(true, &[nfproto(f)])]);
    }
    for m in &rule.matches {
        match m {
            Match::Proto(l4) => {
                x.extend([meta_load(NFT_META_L4PROTO), cmp(true, &[l4_number(*l4)])])
            }
            Match::Dport(p) => x.extend(port_match(2, true, *p)),
            Match::DportRange(lo, hi) => x.extend(port_range(2, *lo, *hi)),
            Match::NotDports(ps) => {
                for p in ps {
                    x.extend(port_match(2, false, *p));
                }
            }
            Match::Sport(p) => x.extend(port_match(0, true, *p)),
            Match::SportRange(lo, hi) => x.extend(port_range(0, *lo, *hi)),
            Match::Daddr(n) => x.extend(addr_match(n, true, true)),
            Match::NotDaddr(n) => x.extend(addr_match(n, true, false)),
            Match::Saddr(n) => x.extend(addr_match(n, false, true)),
            Match::Iif(n) => x.extend(ifname(NFT_META_IIFNAME, n)),
            Match::IifInSet => x.extend(iif_in_set()),
            Match::Oif(n) => x.extend(ifname(NFT_META_OIFNAME, n)),
            Match::Uid(u) => x.extend(meta_u32(NFT_META_SKUID, true, *u)),
            Match::NotUid(u) => x.extend(meta_u32(NFT_META_SKUID, false, *u)),
            Match::Gid(g) => x.extend(meta_u32(NFT_META_SKGID, true, *g)),
            Match::NotGid(g) => x.extend(meta_u32(NFT_META_SKGID, false, *g)),
            Match::Mark(m) => x.extend(mark_match(m, true)),
            Match::NotMark(m) => x.extend(mark_match(m, false)),
            Match::ConnMark(v) => x.extend([ct_load(NFT_CT_MARK), cmp(true, &v.to_ne_bytes())]),
            Match::Ct(state) => {
                let bits = match state {
                    CtState::Invalid => CT_STATE_INVALID,
                    CtState::EstablishedRelated => CT_STATE_ESTABLISHED | CT_STATE_RELATED,
                    CtState::New => CT_STATE_NEW,
                };
                x.extend([
                    ct_load(NFT_CT_STATE),
                    bitwise(&bits.to_ne_bytes()),
                    cmp(false, &0u32.to_ne_bytes()),
                ]);
            }
            Match::ForeignUnicastDaddr => x.extend(fib_daddr_type(RTN_UNICAST)),
            Match::LocalDaddr => x.extend(fib_daddr_type(RTN_LOCAL)),
        }
    }
    match &rule.action {
        Action::Jump(c) => x.push(verdict(
            NFT_JUMP,
            Some(nft_chain(ChainId {
                table: rule.chain.table,
                chain: ChainRef::Own(*c),
            })),
        )),
        Action::Return => x.push(verdict(NFT_RETURN, None)),
        Action::Accept => x.push(verdict(libc::NF_ACCEPT, None)),
        Action::Drop => x.push(verdict(libc::NF_DROP, None)),
        Action::Redirect(p) => x.extend([
            immediate(&p.to_be_bytes()),
            e(
                c"redir",
                vec![
                    Attr::U32(sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN, reg1()),
                    Attr::U32(sys::NFTNL_EXPR_REDIR_REG_PROTO_MAX, reg1()),
                    Attr::U32(sys::NFTNL_EXPR_REDIR_FLAGS, NAT_RANGE_PROTO_SPECIFIED),
                ],
            ),
        ]),
        Action::Tproxy { port, mark } => {
            let family = nfproto(rule.family.unwrap_or(Family::V4));
            x.extend([
                immediate(&port.to_be_bytes()),
                e(
                    c"tproxy",
                    vec![
                        Attr::U32(sys::NFTNL_EXPR_TPROXY_FAMILY, u32::from(family)),
                        Attr::U32(sys::NFTNL_EXPR_TPROXY_REG_PORT, reg1()),
                    ],
                ),
                immediate(&mark.to_ne_bytes()),
                meta_set(NFT_META_MARK),
                verdict(libc::NF_ACCEPT, None),
            ]);
        }
        Action::SetMark(v) => x.extend([immediate(&v.to_ne_bytes()), meta_set(NFT_META_MARK)]),
        Action::CtZone(z) => x.extend([immediate(&z.to_ne_bytes()), ct_set(NFT_CT_ZONE)]),
        Action::SaveMark => x.extend([meta_load(NFT_META_MARK), ct_set(NFT_CT_MARK)]),
        Action::RestoreMark => x.extend([ct_load(NFT_CT_MARK), meta_set(NFT_META_MARK)]),
        Action::Masquerade => x.push(e(c"masq", vec![])),
        Action::Reject => x.push(e(
            c"reject",
            vec![
                Attr::U32(
                    sys::NFTNL_EXPR_REJECT_TYPE,
                    libc::NFT_REJECT_ICMPX_UNREACH as u32,
                ),
                Attr::U32(
                    sys::NFTNL_EXPR_REJECT_CODE,
                    libc::NFT_REJECT_ICMPX_ADMIN_PROHIBITED as u32,
                ),
            ],
        )),
    }
    x
}

/// A rule jumping to a chain that does not exist: the kernel rejects the
/// whole transaction (test hook for "a failed apply leaves nothing").
pub(crate) fn rejected_rule_exprs() -> Vec<RawExpr> {
    vec![verdict(NFT_JUMP, Some("does_not_exist".into()))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::plan::{Hook, Table};

    #[test]
    fn prefix_loads_only_covered_bytes() {
        let v = addr_match(&"10.0.0.0/8".parse().unwrap(), true, true);
        assert_eq!(v.len(), 2);
        assert!(
            v[0].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_PAYLOAD_LEN, 1))
        );
        assert!(
            v[1].attrs
                .contains(&Attr::Bytes(sys::NFTNL_EXPR_CMP_DATA, vec![10]))
        );
        let v = addr_match(&"198.18.0.0/15".parse().unwrap(), true, false);
        assert_eq!(v.len(), 3);
        assert!(
            v[0].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_PAYLOAD_LEN, 4))
        );
        assert!(v[1].attrs.contains(&Attr::Bytes(
            sys::NFTNL_EXPR_BITWISE_MASK,
            vec![0xff, 0xfe, 0, 0]
        )));
        assert!(addr_match(&"0.0.0.0/0".parse().unwrap(), true, true).is_empty());
    }

    #[test]
    fn redirect_rule_matches_nft_encoding() {
        let r = Rule {
            chain: ChainId {
                table: Table::Nat,
                chain: ChainRef::Base(Hook::Output),
            },
            family: None,
            matches: vec![Match::Proto(L4::Tcp), Match::Dport(80)],
            action: Action::Redirect(15001),
        };
        let x = rule_exprs(&r);
        let names: Vec<_> = x.iter().map(|e| e.name.to_str().unwrap()).collect();
        assert_eq!(
            names,
            ["meta", "cmp", "payload", "cmp", "immediate", "redir"]
        );
        assert!(
            x[3].attrs
                .contains(&Attr::Bytes(sys::NFTNL_EXPR_CMP_DATA, vec![0, 80]))
        );
        assert!(
            x[4].attrs
                .contains(&Attr::Bytes(sys::NFTNL_EXPR_IMM_DATA, vec![0x3a, 0x99]))
        );
    }

    fn firewall_rule(family: Option<Family>, matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            chain: ChainId {
                table: Table::Mangle,
                chain: ChainRef::Own(crate::rules::plan::OwnChain::Firewall),
            },
            family,
            matches,
            action,
        }
    }

    fn names(x: &[RawExpr]) -> Vec<&str> {
        x.iter().map(|e| e.name.to_str().unwrap()).collect()
    }

    fn cmp_data(x: &RawExpr) -> Vec<u8> {
        x.attrs
            .iter()
            .find_map(|a| match a {
                Attr::Bytes(k, v) if *k == sys::NFTNL_EXPR_CMP_DATA => Some(v.clone()),
                _ => None,
            })
            .unwrap()
    }

    /// `nft --debug=netlink` of `meta l4proto icmp fib daddr type local
    /// return`: l4proto == 0x01, then `fib daddr type` == 0x00000002.
    #[test]
    fn icmp_and_local_daddr_match_nft_encoding() {
        let r = firewall_rule(
            Some(Family::V4),
            vec![Match::Proto(L4::Icmp), Match::LocalDaddr],
            Action::Return,
        );
        let x = rule_exprs(&r);
        assert_eq!(
            names(&x),
            ["meta", "cmp", "meta", "cmp", "fib", "cmp", "immediate"]
        );
        assert_eq!(cmp_data(&x[3]), [1]);
        assert!(
            x[4].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_FIB_RESULT, FIB_RESULT_ADDRTYPE))
        );
        assert!(
            x[4].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_FIB_FLAGS, FIB_F_DADDR))
        );
        assert_eq!(cmp_data(&x[5]), 2u32.to_ne_bytes());

        let v6 = firewall_rule(
            Some(Family::V6),
            vec![Match::Proto(L4::Icmpv6)],
            Action::Return,
        );
        let x = rule_exprs(&v6);
        assert_eq!(cmp_data(&x[1]), [libc::NFPROTO_IPV6 as u8]);
        assert_eq!(cmp_data(&x[3]), [58]);
    }

    /// `tcp sport 1000-2000`: transport header + 0, gte 0x03e8, lte 0x07d0.
    #[test]
    fn sport_range_matches_nft_encoding() {
        let r = firewall_rule(
            None,
            vec![Match::Proto(L4::Tcp), Match::SportRange(1000, 2000)],
            Action::Drop,
        );
        let x = rule_exprs(&r);
        assert_eq!(
            names(&x),
            ["meta", "cmp", "payload", "cmp", "cmp", "immediate"]
        );
        assert!(
            x[2].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, 0))
        );
        assert!(
            x[3].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_CMP_OP, libc::NFT_CMP_GTE as u32))
        );
        assert_eq!(cmp_data(&x[3]), [0x03, 0xe8]);
        assert!(
            x[4].attrs
                .contains(&Attr::U32(sys::NFTNL_EXPR_CMP_OP, libc::NFT_CMP_LTE as u32))
        );
        assert_eq!(cmp_data(&x[4]), [0x07, 0xd0]);
    }
}
