//! Network namespace handles. This is the only module in the workspace that
//! calls `setns`: it moves only the calling thread, so every switch happens on
//! a short-lived OS thread of its own (or in a child before exec) and never
//! leaks into the async runtime's worker threads.

#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nsm_api::inode::InodeUrl;

/// Identity of a network namespace: the (st_dev, st_ino) of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    pub fn inode_url(self) -> InodeUrl {
        InodeUrl::new(self.dev, self.ino)
    }
}

impl From<InodeUrl> for NetnsId {
    fn from(u: InodeUrl) -> Self {
        NetnsId {
            dev: u.dev,
            ino: u.ino,
        }
    }
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "inode://{}/{}", self.dev, self.ino)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {spec:?} not found")]
    NotFound { spec: String },
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a network namespace")]
    NotNetns { what: String },
    #[error("invalid network namespace name {0:?}: no '/', whitespace or control characters, at most 255 bytes")]
    BadName(String),
    #[error("cannot enter network namespace {id}: {source}")]
    Enter {
        id: NetnsId,
        #[source]
        source: nix::Error,
    },
    #[error("namespace worker thread failed: {0}")]
    Thread(String),
}

/// An open network namespace. Holding it keeps the namespace alive (even after
/// `ip netns del`), so hold it only as long as work in it is pending.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NetnsId,
}

impl Netns {
    /// Opens a namespace by `name` (`/run/netns/<name>`), absolute path
    /// (`/run/netns/x`, `/proc/<pid>/ns/net`) or `inode://dev/ino` URL.
    pub fn open(spec: &str) -> Result<Netns, NetnsError> {
        if spec.starts_with(InodeUrl::SCHEME) {
            let url: InodeUrl = spec.parse().map_err(|_| NetnsError::NotFound {
                spec: spec.to_owned(),
            })?;
            return Self::find(url.into());
        }
        if spec.starts_with('/') {
            return Self::open_path(Path::new(spec));
        }
        if spec.is_empty()
            || spec.len() > 255
            || spec == "."
            || spec == ".."
            || spec
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(NetnsError::BadName(spec.to_owned()));
        }
        let path = Path::new("/run/netns").join(spec);
        if !path.exists() {
            return Err(NetnsError::NotFound {
                spec: spec.to_owned(),
            });
        }
        Self::open_path(&path)
    }

    /// The calling thread's namespace.
    pub fn current() -> Result<Netns, NetnsError> {
        Self::open_path(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn open_path(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => NetnsError::NotFound {
                spec: path.display().to_string(),
            },
            _ => NetnsError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        Self::from_fd(file.into(), &path.display().to_string())
    }

    /// Adopts a descriptor received from elsewhere (e.g. over grpcfd), checking
    /// that it really is a network namespace.
    pub fn from_fd(fd: OwnedFd, what: &str) -> Result<Netns, NetnsError> {
        // nsfs files read back as "net:[<ino>]" through /proc/self/fd.
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !link.starts_with("net:[") {
            return Err(NetnsError::NotNetns {
                what: what.to_owned(),
            });
        }
        let md = File::from(fd.try_clone().map_err(|source| NetnsError::Open {
            path: what.into(),
            source,
        })?)
        .metadata()
        .map_err(|source| NetnsError::Open {
            path: what.into(),
            source,
        })?;
        Ok(Netns {
            fd,
            id: NetnsId {
                dev: md.dev(),
                ino: md.ino(),
            },
        })
    }

    /// Finds a namespace by identity: `/run/netns/*`, then every process's
    /// `/proc/<pid>/ns/net` (NSM names a client's netns by inode only).
    pub fn find(id: NetnsId) -> Result<Netns, NetnsError> {
        let matches = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.dev() == id.dev && m.ino() == id.ino)
                .unwrap_or(false)
        };
        let named = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path());
        let procs = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .map(|e| e.path().join("ns/net"));
        for p in named.chain(procs) {
            if matches(&p) {
                // Re-check after opening: the process may have exited or changed namespace.
                if let Ok(ns) = Self::open_path(&p) {
                    if ns.id == id {
                        return Ok(ns);
                    }
                }
            }
        }
        Err(NetnsError::NotFound {
            spec: id.to_string(),
        })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn inode_url(&self) -> InodeUrl {
        self.id.inode_url()
    }

    pub fn try_clone(&self) -> std::io::Result<Netns> {
        Ok(Netns {
            fd: self.fd.try_clone()?,
            id: self.id,
        })
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace; the
    /// thread exits afterwards, so no other code ever runs in the wrong netns.
    /// Sockets created by `f` stay bound to this namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::Enter {
                        id: self.id,
                        source,
                    }
                })?;
                Ok(f())
            })
            .join()
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned());
                NetnsError::Thread(msg)
            })?
        })
    }

    /// Makes `cmd`'s child enter this namespace between fork and exec.
    pub fn enter_in_child(&self, cmd: &mut std::process::Command) {
        let fd = self.fd.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setns(2), which is async-signal-safe; `fd` is inherited open
        // (the child gets a copy of the table) for as long as `self` lives,
        // which outlives the spawn call that runs this hook.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(fd);
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_has_identity_and_round_trips_through_proc() {
        let ns = Netns::current().unwrap();
        let again = Netns::open(&format!("/proc/{}/ns/net", std::process::id())).unwrap();
        assert_eq!(ns.id(), again.id());
        assert_eq!(Netns::find(ns.id()).unwrap().id(), ns.id());
        assert_eq!(
            Netns::open(&ns.inode_url().to_string()).unwrap().id(),
            ns.id()
        );
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            Netns::open("no-such-ns-4242"),
            Err(NetnsError::NotFound { .. })
        ));
        assert!(matches!(
            Netns::open("a b"),
            Err(NetnsError::BadName(_))
        ));
        assert!(matches!(
            Netns::open("/etc/hostname"),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(matches!(
            Netns::open("/proc/self/ns/uts"),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(matches!(
            Netns::open("inode://1/2"),
            Err(NetnsError::NotFound { .. })
        ));
    }

    #[test]
    fn run_returns_the_closure_value_and_leaves_caller_alone() {
        let before = Netns::current().unwrap().id();
        let ns = Netns::current().unwrap();
        let inner = ns.run(|| Netns::current().map(|n| n.id())).unwrap().unwrap();
        assert_eq!(inner, before);
        assert_eq!(Netns::current().unwrap().id(), before);
    }
}
