//! The endpoint's own network namespace, opened once at start and kept: its
//! fd is what the forwarder receives to build the client's interface here,
//! and its inode URL is what the KERNEL mechanism names.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use nsm_api::grpcfd;
use nsm_api::inode::InodeUrl;

/// Where a thread's netns is; this process never calls setns, so every thread's is the same.
pub const OWN_NETNS_PATH: &str = "/proc/thread-self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open {OWN_NETNS_PATH}: {0}")]
    Open(#[source] std::io::Error),
    #[error("cannot fstat {OWN_NETNS_PATH}: {0}")]
    Stat(#[source] std::io::Error),
}

#[derive(Debug)]
pub struct OwnNetns {
    file: File,
    url: InodeUrl,
}

impl OwnNetns {
    pub fn open() -> Result<Self, NetnsError> {
        let file = File::open(OWN_NETNS_PATH).map_err(NetnsError::Open)?;
        let url = grpcfd::inode_url_of(file.as_fd()).map_err(NetnsError::Stat)?;
        Ok(OwnNetns { file, url })
    }

    /// `inode://<dev>/<ino>` of the namespace.
    pub fn url(&self) -> InodeUrl {
        self.url
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Whether a link named `name` exists in our netns (the process never
/// leaves it, so any thread's view is ours).
pub fn has_link(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}
