//! Links: find, veth pairs (peer created directly in its namespace), up/down,
//! move, delete.

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::nsid::{NsidAttribute, NsidMessage};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{LinkError, Links, MacAddr, Result, is_errno};
use crate::netns::Netns;

/// Smallest MTU the kernel accepts on an Ethernet-like link (IPv4 minimum).
const MIN_MTU: u32 = 68;
/// veth's maximum (ETH_MAX_MTU).
const MAX_MTU: u32 = 65535;

/// A veth pair to create: `name` in the namespace of the handle that creates
/// it, `peer_name` in the peer handle's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    pub name: String,
    pub peer_name: String,
    /// Both ends; `None` keeps the kernel's default (1500) for a new pair and
    /// accepts any MTU on an existing one.
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
    pub peer_mac: Option<MacAddr>,
}

impl VethSpec {
    pub fn new(name: impl Into<String>, peer_name: impl Into<String>) -> VethSpec {
        VethSpec {
            name: name.into(),
            peer_name: peer_name.into(),
            mtu: None,
            mac: None,
            peer_mac: None,
        }
    }

    /// Checks names, MTU and MACs without touching the kernel.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        validate_name(&self.peer_name)?;
        if let Some(mtu) = self.mtu
            && !(MIN_MTU..=MAX_MTU).contains(&mtu)
        {
            return Err(LinkError::InvalidRequest(format!(
                "MTU {mtu} is outside {MIN_MTU}..={MAX_MTU}"
            )));
        }
        for mac in [self.mac, self.peer_mac].into_iter().flatten() {
            if !mac.is_assignable() {
                return Err(LinkError::InvalidRequest(format!(
                    "MAC {mac} is not a unicast address"
                )));
            }
        }
        Ok(())
    }
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    nsm_api::mechanism::validate_interface_name(name).map_err(|source| LinkError::InvalidName {
        name: name.to_owned(),
        source,
    })
}

/// What the kernel reports about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    /// The rtnetlink kind (`veth`, `dummy`, …); `None` for physical devices.
    pub kind: Option<String>,
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
    /// Administratively up.
    pub up: bool,
    /// A veth's peer ifindex, counted in the peer's namespace.
    pub peer_index: Option<u32>,
    /// The peer's namespace as an nsid of this namespace; `None` when the
    /// peer lives in the same namespace.
    pub peer_nsid: Option<i32>,
}

impl LinkState {
    fn from_message(m: &LinkMessage) -> LinkState {
        let mut s = LinkState {
            index: m.header.index,
            name: String::new(),
            kind: None,
            mtu: None,
            mac: None,
            up: m.header.flags.contains(LinkFlags::Up),
            peer_index: None,
            peer_nsid: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name = n.clone(),
                LinkAttribute::Mtu(mtu) => s.mtu = Some(*mtu),
                LinkAttribute::Address(b) => s.mac = MacAddr::from_bytes(b),
                LinkAttribute::Link(i) => s.peer_index = Some(*i),
                LinkAttribute::LinkNetNsId(id) => s.peer_nsid = Some(*id),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            s.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        s
    }

    fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// The two ends of a veth pair as they are in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPair {
    pub local: LinkState,
    pub peer: LinkState,
    /// `false` when an identical pair already existed and nothing changed.
    pub created: bool,
}

impl Links {
    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>> {
        validate_name(name)?;
        let req = LinkMessageBuilder::<LinkUnspec>::new().name(name).build();
        self.get_link(req, name).await
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkState>> {
        let req = LinkMessageBuilder::<LinkUnspec>::new().index(index).build();
        self.get_link(req, &format!("ifindex {index}")).await
    }

    async fn get_link(&self, req: LinkMessage, what: &str) -> Result<Option<LinkState>> {
        match self.get(RouteNetlinkMessage::GetLink(req), false).await {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(LinkState::from_message(m)),
                _ => None,
            })),
            Err(e) if is_errno(&e, Errno::ENODEV) => Ok(None),
            Err(e) => Err(self.kernel_err(format!("look up link {what}"), e)),
        }
    }

    /// Creates the veth pair `spec`, its peer directly inside `peer`'s
    /// namespace (one RTM_NEWLINK with IFLA_NET_NS_FD: far cheaper than
    /// creating it here and moving it). An identical existing pair is reused;
    /// anything else already using either name is a [`LinkError::LinkConflict`].
    /// The create comes first (exclusive): the usual case, a new pair, then
    /// costs no lookups, and a name in use makes the kernel say so.
    pub async fn add_veth(&self, spec: &VethSpec, peer: &Links) -> Result<VethPair> {
        spec.validate()?;
        let same_ns = self.netns_id() == peer.netns_id();
        if same_ns && spec.name == spec.peer_name {
            return Err(LinkError::InvalidRequest(format!(
                "both ends of the veth are called {:?} in one namespace",
                spec.name
            )));
        }
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(spec.peer_name.as_str());
        if !same_ns {
            peer_msg = peer_msg.setns_by_fd(peer.netns().as_fd().as_raw_fd());
        }
        let mut msg = LinkVeth::new(&spec.name, &spec.peer_name);
        if let Some(mtu) = spec.mtu {
            // veth applies IFLA_MTU to each end separately.
            msg = msg.mtu(mtu);
            peer_msg = peer_msg.mtu(mtu);
        }
        if let Some(mac) = spec.mac {
            msg = msg.address(mac.0.to_vec());
        }
        if let Some(mac) = spec.peer_mac {
            peer_msg = peer_msg.address(mac.0.to_vec());
        }
        let msg = msg
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        match self
            .ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .await
        {
            Ok(()) => {}
            // Already there (ours from before, or a racing creator's):
            // identical is fine, anything else a conflict.
            Err(e) if is_errno(&e, Errno::EEXIST) => {
                return match self.existing_veth(spec, peer).await? {
                    Some(pair) => Ok(pair),
                    None => Err(self.kernel_err(format!("create veth {:?}", spec.name), e)),
                };
            }
            Err(e) => {
                return Err(self.kernel_err(
                    format!("create veth {:?} (peer {:?})", spec.name, spec.peer_name),
                    e,
                ));
            }
        }
        let local = self.must_link(&spec.name).await?;
        let peer_state = peer.must_link(&spec.peer_name).await?;
        Ok(VethPair {
            local,
            peer: peer_state,
            created: true,
        })
    }

    async fn must_link(&self, name: &str) -> Result<LinkState> {
        self.link(name)
            .await?
            .ok_or_else(|| LinkError::LinkNotFound {
                name: name.to_owned(),
                netns: self.netns_id(),
            })
    }

    /// `Some` when `spec` already exists exactly; `None` when neither name is
    /// taken; a conflict otherwise.
    pub(super) async fn existing_veth(
        &self,
        spec: &VethSpec,
        peer: &Links,
    ) -> Result<Option<VethPair>> {
        let conflict = |name: &str, why: String| LinkError::LinkConflict {
            name: name.to_owned(),
            why,
        };
        let local = self.link(&spec.name).await?;
        let remote = peer.link(&spec.peer_name).await?;
        let (local, remote) = match (local, remote) {
            (None, None) => return Ok(None),
            (None, Some(r)) => {
                return Err(conflict(
                    &spec.peer_name,
                    format!(
                        "the peer name is taken in network namespace {} by another {} link",
                        peer.netns_id(),
                        r.kind.as_deref().unwrap_or("physical")
                    ),
                ));
            }
            (Some(l), r) => (l, r),
        };
        if !local.is_veth() {
            return Err(conflict(
                &spec.name,
                format!(
                    "it is a {} link, not a veth",
                    local.kind.as_deref().unwrap_or("physical")
                ),
            ));
        }
        let peer_ns_matches = if self.netns_id() == peer.netns_id() {
            local.peer_nsid.is_none()
        } else {
            local.peer_nsid.is_some() && local.peer_nsid == self.nsid_of(peer.netns()).await?
        };
        let is_our_peer = remote.as_ref().is_some_and(|r| {
            r.is_veth() && Some(r.index) == local.peer_index && r.peer_index == Some(local.index)
        });
        let Some(remote) = remote.filter(|_| is_our_peer && peer_ns_matches) else {
            return Err(conflict(
                &spec.name,
                format!(
                    "it is a veth whose peer is not {:?} in network namespace {}",
                    spec.peer_name,
                    peer.netns_id()
                ),
            ));
        };
        for (end, name, mac) in [
            (&local, &spec.name, spec.mac),
            (&remote, &spec.peer_name, spec.peer_mac),
        ] {
            if let Some(mtu) = spec.mtu
                && end.mtu != Some(mtu)
            {
                return Err(conflict(
                    name,
                    format!("its MTU is {:?}, not {mtu}", end.mtu),
                ));
            }
            if mac.is_some() && end.mac != mac {
                return Err(conflict(
                    name,
                    format!("its MAC is {:?}, not {:?}", end.mac, mac),
                ));
            }
        }
        Ok(Some(VethPair {
            local,
            peer: remote,
            created: false,
        }))
    }

    /// The nsid this namespace uses for `other`, if one is assigned (the
    /// kernel assigns one when it reports a cross-namespace veth).
    pub async fn nsid_of(&self, other: &Netns) -> Result<Option<i32>> {
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(other.as_fd().as_raw_fd() as u32));
        let replies = self
            .get(RouteNetlinkMessage::GetNsId(msg), false)
            .await
            .map_err(|e| self.kernel_err(format!("get nsid of {}", other.id()), e))?;
        Ok(replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewNsId(m) => m.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }))
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .up()
            .build();
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
            .await
            .map_err(|e| self.kernel_err(format!("set ifindex {index} up"), e))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .mtu(mtu)
            .build();
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
            .await
            .map_err(|e| self.kernel_err(format!("set ifindex {index} mtu {mtu}"), e))
    }

    pub async fn set_down(&self, index: u32) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .down()
            .build();
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
            .await
            .map_err(|e| self.kernel_err(format!("set ifindex {index} down"), e))
    }

    /// Moves link `name` into namespace `to` (keeping its name).
    pub async fn move_link(&self, name: &str, to: &Netns) -> Result<()> {
        let link = self.must_link(name).await?;
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(link.index)
            .setns_by_fd(to.as_fd().as_raw_fd())
            .build();
        self.ack(RouteNetlinkMessage::SetLink(msg), 0)
            .await
            .map_err(|e| self.kernel_err(format!("move link {name:?} to {}", to.id()), e))
    }

    /// Deletes link `name` (for a veth, both ends go). `Ok(false)` if it
    /// does not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        self.delete_index(link.index, name).await
    }

    pub(crate) async fn delete_index(&self, index: u32, name: &str) -> Result<bool> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new().index(index).build();
        match self.ack(RouteNetlinkMessage::DelLink(msg), 0).await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::ENODEV) => Ok(false),
            Err(e) => Err(self.kernel_err(format!("delete link {name:?}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_names_mtu_and_macs() {
        assert!(VethSpec::new("nsm-1", "nsm-1-peer").validate().is_ok());
        for (a, b) in [
            ("waytoolongname16", "ok"),
            ("ok", "a/b"),
            ("a b", "ok"),
            ("ok", "a\u{1}"),
            ("", "ok"),
        ] {
            assert!(
                matches!(
                    VethSpec::new(a, b).validate(),
                    Err(LinkError::InvalidName { .. })
                ),
                "{a:?} {b:?}"
            );
        }
        let mut s = VethSpec::new("a", "b");
        s.mtu = Some(67);
        assert!(matches!(s.validate(), Err(LinkError::InvalidRequest(_))));
        s.mtu = Some(9000);
        s.peer_mac = Some("01:00:5e:00:00:01".parse().unwrap());
        assert!(matches!(s.validate(), Err(LinkError::InvalidRequest(_))));
    }
}
