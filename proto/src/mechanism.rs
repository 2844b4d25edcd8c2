//! Mechanism classes, types and parameter keys (upstream keeps these as Go
//! constants, not protos), with typed accessors on [`Mechanism`].

use crate::connection::Mechanism;
use crate::inode::{InodeUrl, InodeUrlError};

pub const CLS_LOCAL: &str = "LOCAL";
pub const CLS_REMOTE: &str = "REMOTE";

pub const KERNEL: &str = "KERNEL";
pub const MEMIF: &str = "MEMIF";
pub const VFIO: &str = "VFIO";
pub const VXLAN: &str = "VXLAN";
pub const WIREGUARD: &str = "WIREGUARD";
pub const NOOP: &str = "NOOP";

/// Parameter keys shared by mechanisms.
pub mod keys {
    /// Interface name (Linux limit: 15 bytes).
    pub const NAME: &str = "name";
    /// `inode://dev/ino` (or `file://…`) of the netns the interface belongs in.
    pub const INODE_URL: &str = "inodeURL";
    pub const MTU: &str = "MTU";
    pub const SRC_IP: &str = "src_ip";
    pub const DST_IP: &str = "dst_ip";
}

/// Linux `IFNAMSIZ - 1`.
pub const LINUX_IF_MAX_LENGTH: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MechanismError {
    #[error("interface name is empty")]
    EmptyName,
    #[error("interface name {0:?} is longer than {LINUX_IF_MAX_LENGTH} bytes")]
    NameTooLong(String),
    #[error("interface name {0:?} contains '/', ':', whitespace or a control character")]
    NameCharacters(String),
    #[error("interface name {0:?} is reserved")]
    NameReserved(String),
    #[error("mechanism parameter {key} is missing")]
    Missing { key: &'static str },
    #[error(transparent)]
    Inode(#[from] InodeUrlError),
}

/// Checks a Linux interface name the way the kernel's `dev_valid_name` does.
pub fn validate_interface_name(name: &str) -> Result<(), MechanismError> {
    if name.is_empty() {
        return Err(MechanismError::EmptyName);
    }
    if name.len() > LINUX_IF_MAX_LENGTH {
        return Err(MechanismError::NameTooLong(name.to_owned()));
    }
    if name == "." || name == ".." {
        return Err(MechanismError::NameReserved(name.to_owned()));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(MechanismError::NameCharacters(name.to_owned()));
    }
    Ok(())
}

/// A LOCAL/KERNEL mechanism with the given parameters.
pub fn kernel(params: impl IntoIterator<Item = (String, String)>) -> Mechanism {
    Mechanism {
        cls: CLS_LOCAL.to_owned(),
        r#type: KERNEL.to_owned(),
        parameters: params.into_iter().collect(),
    }
}

/// Typed access to the well-known parameters.
pub trait MechanismExt {
    fn is_kernel(&self) -> bool;
    fn param(&self, key: &str) -> Option<&str>;
    fn interface_name(&self) -> Option<&str>;
    /// The `inodeURL` parameter parsed as `inode://dev/ino`.
    fn inode_url(&self) -> Result<InodeUrl, MechanismError>;
    fn set_param(&mut self, key: &str, value: impl Into<String>);
}

impl MechanismExt for Mechanism {
    fn is_kernel(&self) -> bool {
        self.r#type == KERNEL
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.parameters
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn interface_name(&self) -> Option<&str> {
        self.param(keys::NAME)
    }

    fn inode_url(&self) -> Result<InodeUrl, MechanismError> {
        let raw = self.param(keys::INODE_URL).ok_or(MechanismError::Missing {
            key: keys::INODE_URL,
        })?;
        Ok(raw.parse()?)
    }

    fn set_param(&mut self, key: &str, value: impl Into<String>) {
        self.parameters.insert(key.to_owned(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(validate_interface_name("nsm-1").is_ok());
        assert!(validate_interface_name("mesh-proxy-Ab3x").is_ok());
        assert_eq!(
            validate_interface_name("0123456789abcdef"),
            Err(MechanismError::NameTooLong("0123456789abcdef".into()))
        );
        for bad in ["a/b", "a b", "a\tb", "a\u{7}", "eth0:1"] {
            assert!(validate_interface_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_interface_name("").is_err());
        assert!(validate_interface_name("..").is_err());
    }

    #[test]
    fn accessors() {
        let mut m = kernel([("name".to_owned(), "nsm-1".to_owned())]);
        assert!(m.is_kernel());
        assert_eq!(m.interface_name(), Some("nsm-1"));
        assert!(matches!(m.inode_url(), Err(MechanismError::Missing { .. })));
        m.set_param(keys::INODE_URL, "inode://4/42");
        assert_eq!(m.inode_url().unwrap(), InodeUrl::new(4, 42));
    }
}
