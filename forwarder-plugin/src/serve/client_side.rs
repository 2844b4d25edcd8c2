//! The client's side of a Request: its LOCAL/KERNEL mechanism (`name`,
//! `inodeURL`) and its network namespace, from the fd it sent on this unix
//! connection — never looked up by inode, which anyone can name.

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::grpcfd::FdChannel;
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{self as mech, MechanismExt};

use super::downstream::receive_netns;
use crate::netns::{Netns, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no LOCAL/KERNEL mechanism among the preferences ({offered}): this forwarder plumbs KERNEL interfaces"
    )]
    NoKernel { offered: String },
    #[error(
        "connection.mechanism {cls}/{ty} is not LOCAL/KERNEL: this forwarder plumbs KERNEL interfaces"
    )]
    Unsupported { cls: String, ty: String },
    #[error("the KERNEL mechanism's parameter name: {0}")]
    Name(#[source] mech::MechanismError),
    #[error("the KERNEL mechanism's parameter inodeURL (the client's netns): {0}")]
    Inode(#[source] mech::MechanismError),
    #[error(
        "no fd for the client's network namespace {inode} came with the Request: send it beside \
         the message on the same unix connection (grpcfd), as NSM's clients do; a namespace is \
         plumbed only through its fd"
    )]
    NoFd { inode: InodeUrl },
    #[error("the client's network namespace {inode}: {source}")]
    Netns {
        inode: InodeUrl,
        #[source]
        source: NetnsError,
    },
}

/// The client's mechanism: `connection.mechanism` when set (a refresh; it
/// must be LOCAL/KERNEL), else the first LOCAL/KERNEL preference — with a
/// valid `name` and an `inode://` `inodeURL`.
pub fn client_mechanism(
    conn: &Connection,
    preferences: &[Mechanism],
) -> Result<Mechanism, ClientError> {
    let is_local_kernel = |m: &Mechanism| m.cls == mech::CLS_LOCAL && m.is_kernel();
    let m = match &conn.mechanism {
        Some(m) if is_local_kernel(m) => m.clone(),
        Some(m) => {
            return Err(ClientError::Unsupported {
                cls: m.cls.clone(),
                ty: m.r#type.clone(),
            });
        }
        None => preferences
            .iter()
            .find(|m| is_local_kernel(m))
            .cloned()
            .ok_or_else(|| ClientError::NoKernel {
                offered: if preferences.is_empty() {
                    "none offered".into()
                } else {
                    preferences
                        .iter()
                        .map(|m| format!("{}/{}", m.cls, m.r#type))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?,
    };
    let name = m
        .interface_name()
        .ok_or(ClientError::Name(mech::MechanismError::Missing {
            key: mech::keys::NAME,
        }))?;
    mech::validate_interface_name(name).map_err(ClientError::Name)?;
    m.inode_url().map_err(ClientError::Inode)?;
    Ok(m)
}

/// The client's netns: the fd named by `inodeURL` on the caller's unix
/// connection, checked to be a network namespace.
pub async fn client_netns(fds: Option<&FdChannel>, m: &Mechanism) -> Result<Netns, ClientError> {
    let inode = m.inode_url().map_err(ClientError::Inode)?;
    let Some(fds) = fds else {
        return Err(ClientError::NoFd { inode });
    };
    match receive_netns(fds, inode, "the client's netns fd").await {
        Ok(Some(ns)) => Ok(ns),
        Ok(None) => Err(ClientError::NoFd { inode }),
        Err(source) => Err(ClientError::Netns { inode, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(params: &[(&str, &str)]) -> Mechanism {
        mech::kernel(
            params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn first_local_kernel_preference_or_the_preset_mechanism() {
        let good = kernel(&[("name", "nsm-1"), ("inodeURL", "inode://4/42")]);
        let memif = Mechanism {
            cls: "LOCAL".into(),
            r#type: "MEMIF".into(),
            ..Default::default()
        };
        let got = client_mechanism(&Connection::default(), &[memif.clone(), good.clone()]).unwrap();
        assert_eq!(got, good);
        let preset = Connection {
            mechanism: Some(good.clone()),
            ..Default::default()
        };
        assert_eq!(client_mechanism(&preset, &[]).unwrap(), good);
        let e = client_mechanism(
            &Connection {
                mechanism: Some(memif.clone()),
                ..Default::default()
            },
            &[good],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("LOCAL/MEMIF is not LOCAL/KERNEL"),
            "{e}"
        );
        let e = client_mechanism(&Connection::default(), &[memif]).unwrap_err();
        assert!(e.to_string().contains("(LOCAL/MEMIF)"), "{e}");
    }

    #[test]
    fn name_and_inode_url_are_required_and_checked() {
        for (params, want) in [
            (&[("inodeURL", "inode://4/42")][..], "parameter name"),
            (
                &[
                    ("name", "this-is-too-long-16"),
                    ("inodeURL", "inode://4/42"),
                ][..],
                "parameter name",
            ),
            (&[("name", "nsm-1")][..], "inodeURL"),
            (
                &[("name", "nsm-1"), ("inodeURL", "file:///proc/self/ns/net")][..],
                "inodeURL",
            ),
        ] {
            let e = client_mechanism(&Connection::default(), &[kernel(params)]).unwrap_err();
            assert!(e.to_string().contains(want), "{params:?}: {e}");
        }
    }
}
