//! Network namespace handles. This is the only module in the workspace that
//! calls `setns`: it moves only the calling thread, so every switch happens on
//! a short-lived OS thread of its own (or in a child before exec) and never
//! leaks into the async runtime's worker threads.

#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
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
    #[error(
        "invalid network namespace name {0:?}: no '/', whitespace or control characters, at most 255 bytes"
    )]
    BadName(String),
    #[error("cannot enter network namespace {id}: {source}")]
    Enter {
        id: NetnsId,
        #[source]
        source: nix::Error,
    },
    #[error("namespace worker thread failed: {0}")]
    Thread(String),
    #[error("cannot read the cookie of network namespace {id}: {source}")]
    Cookie {
        id: NetnsId,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {name:?} already exists")]
    Exists { name: String },
    #[error("cannot {op} network namespace {name:?}: {source}")]
    Named {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where named namespaces live, as with `ip netns`.
pub const NETNS_RUN_DIR: &str = "/run/netns";

fn check_name(name: &str) -> Result<(), NetnsError> {
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(NetnsError::BadName(name.to_owned()));
    }
    Ok(())
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
        check_name(spec)?;
        let path = Path::new(NETNS_RUN_DIR).join(spec);
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
        let fd = reopen_o_path(fd, what)?;
        if !is_netns(fd.as_fd()) {
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
        for p in netns_paths() {
            if matches(&p) {
                // Re-check after opening: the process may have exited or changed namespace.
                if let Ok(ns) = Self::open_path(&p)
                    && ns.id == id
                {
                    return Ok(ns);
                }
            }
        }
        Err(NetnsError::NotFound {
            spec: id.to_string(),
        })
    }

    /// The network namespaces that exist now, as far as names and processes
    /// show (`/run/netns/*`, every `/proc/<pid>/ns/net`): what NSM's
    /// forwarders scan to notice a dead pod. For monitoring only — never an
    /// authority to act in a namespace.
    pub fn live_ids() -> std::collections::HashSet<NetnsId> {
        Self::live_ids_ignoring(&std::collections::HashSet::new())
    }

    /// [`Netns::live_ids`] without the namespaces of processes `pids`
    /// (proxies we run in clients' namespaces, which would otherwise keep a
    /// dead pod's namespace looking alive).
    pub fn live_ids_ignoring(
        pids: &std::collections::HashSet<u32>,
    ) -> std::collections::HashSet<NetnsId> {
        netns_paths()
            .filter(|p| {
                p.strip_prefix("/proc")
                    .ok()
                    .and_then(|rest| rest.iter().next())
                    .and_then(|pid| pid.to_str()?.parse::<u32>().ok())
                    .is_none_or(|pid| !pids.contains(&pid))
            })
            .filter_map(|p| {
                std::fs::metadata(p).ok().map(|m| NetnsId {
                    dev: m.dev(),
                    ino: m.ino(),
                })
            })
            .collect()
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

    /// The namespace's cookie: a number the kernel gives each network
    /// namespace once and never again (unlike its inode number, which a
    /// later namespace may get), read with `SO_NETNS_COOKIE` from a socket
    /// made inside it. What proves, after a restart, that the namespace
    /// found by inode is the one recorded.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        self.run(Netns::current_cookie)?
            .map_err(|source| NetnsError::Cookie {
                id: self.id,
                source,
            })
    }

    /// The cookie of the calling thread's namespace ([`Netns::cookie`]
    /// without entering anything: no `CAP_SYS_ADMIN` needed).
    pub fn current_cookie() -> std::io::Result<u64> {
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)?;
        netns_cookie(sock.as_fd())
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
                // Already there (a process working in its own namespace):
                // no setns, which would need CAP_SYS_ADMIN on top of the
                // CAP_NET_ADMIN the work itself needs.
                if !self.is_current() {
                    setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetnsError::Enter {
                            id: self.id,
                            source,
                        }
                    })?;
                }
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

    /// Creates a new, empty network namespace named `name` under
    /// `/run/netns` (as `ip netns add` does, without spawning it). The
    /// namespace is made by `unshare` on a throw-away thread and kept alive by
    /// a bind mount of that thread's nsfs file.
    pub fn create_named(name: &str) -> Result<Netns, NetnsError> {
        check_name(name)?;
        let named = |op, source| NetnsError::Named {
            op,
            name: name.to_owned(),
            source,
        };
        make_run_dir_shared().map_err(|e| named("prepare /run/netns for", e))?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        // The mount point: created exclusively so two creators of one name
        // cannot both succeed.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => NetnsError::Exists {
                    name: name.to_owned(),
                },
                _ => named("create", e),
            })?;
        // unshare(CLONE_NEWNET) affects only the calling thread, which exits
        // right after the bind mount: nothing else ever runs in the new netns.
        let bound = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<()> {
                unshare(CloneFlags::CLONE_NEWNET)?;
                // /proc/self would name the main thread's namespace.
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )?;
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
        });
        if let Err(e) = bound {
            let _ = std::fs::remove_file(&path);
            return Err(named("create", e));
        }
        Self::open_path(&path).inspect_err(|_| {
            let _ = Self::delete_named(name);
        })
    }

    /// Removes a namespace made by [`Netns::create_named`] or `ip netns add`:
    /// detaches the bind mount and removes the file. The namespace itself
    /// lives on while anything (an open [`Netns`], a socket, a process) still
    /// holds it.
    pub fn delete_named(name: &str) -> Result<(), NetnsError> {
        check_name(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        if !path.exists() {
            return Err(NetnsError::NotFound {
                spec: name.to_owned(),
            });
        }
        match umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (a stale file left by a crash).
            Ok(()) | Err(nix::Error::EINVAL) => {}
            Err(e) => {
                return Err(NetnsError::Named {
                    op: "unmount",
                    name: name.to_owned(),
                    source: e.into(),
                });
            }
        }
        std::fs::remove_file(&path).map_err(|source| NetnsError::Named {
            op: "remove",
            name: name.to_owned(),
            source,
        })
    }

    /// Whether the calling thread is in this namespace.
    pub fn is_current(&self) -> bool {
        std::fs::metadata("/proc/thread-self/ns/net")
            .is_ok_and(|m| m.dev() == self.id.dev && m.ino() == self.id.ino)
    }

    /// What a child made with our own `pre_exec` hook calls to enter this
    /// namespace between fork and exec — first, before a uid change drops
    /// the capability setns(2) needs. `self` must outlive the spawn.
    pub fn child_entry(&self) -> ChildEntry {
        ChildEntry {
            fd: self.fd.as_raw_fd(),
            stay: self.is_current(),
        }
    }

    /// Makes `cmd`'s child enter this namespace between fork and exec (a
    /// child of a thread already in it just stays: see [`Netns::run`]).
    pub fn enter_in_child(&self, cmd: &mut std::process::Command) {
        if self.is_current() {
            return;
        }
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

/// A namespace entry for a forked child ([`Netns::child_entry`]).
#[derive(Debug, Clone, Copy)]
pub struct ChildEntry {
    fd: std::os::fd::RawFd,
    /// Already there: nothing to do.
    stay: bool,
}

impl ChildEntry {
    /// setns(2) into the namespace; async-signal-safe, for a pre-exec hook.
    pub fn enter(&self) -> std::io::Result<()> {
        if self.stay {
            return Ok(());
        }
        // SAFETY: `fd` is the open namespace descriptor of the Netns this
        // entry came from, which its caller keeps alive across the spawn;
        // the child inherited a copy of the descriptor table.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
    }
}

/// `SO_NETNS_COOKIE` (asm-generic/socket.h; Linux 5.14): the cookie of
/// the network namespace socket `fd` was made in. nix has no wrapper.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn netns_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live
    // u64 whose size `len` states, and stores the written length in `len`;
    // `fd` is a valid socket borrowed for this call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<u64>() {
        return Err(std::io::Error::other("short SO_NETNS_COOKIE"));
    }
    Ok(cookie)
}

/// Whether `fd` is a network namespace. The file must be on nsfs (checked
/// first, so the ioctl below never reaches another driver) and of type net.
/// (Reading `/proc/self/fd/N` is not enough: a bind-mounted namespace such as
/// `/run/netns/x` reads back as its mount path, not `net:[ino]`.)
/// Where namespaces show: `/run/netns/*`, then every process's `/proc/<pid>/ns/net`.
fn netns_paths() -> impl Iterator<Item = PathBuf> {
    let named = std::fs::read_dir(NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
        .map(|e| e.path().join("ns/net"));
    named.chain(procs)
}

fn on_nsfs(fd: BorrowedFd<'_>) -> bool {
    nix::sys::statfs::fstatfs(fd).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// grpcfd (how NSM's Go components pass files) sends every file as an
/// `O_PATH` descriptor, on which ioctl and setns fail with EBADF. Such a
/// descriptor of an nsfs file is reopened through its own `/proc/self/fd`
/// link, which names the same namespace (what NSM's Go side does with it);
/// anything else is left as it is for [`is_netns`] to refuse. Checking nsfs
/// first means a hostile `O_PATH` fd of a FIFO is never opened (that open
/// would block).
fn reopen_o_path(fd: OwnedFd, what: &str) -> Result<OwnedFd, NetnsError> {
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0);
    if flags & libc::O_PATH == 0 || !on_nsfs(fd.as_fd()) {
        return Ok(fd);
    }
    let link = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    File::open(&link)
        .map(OwnedFd::from)
        .map_err(|source| NetnsError::Open {
            path: what.into(),
            source,
        })
}

fn is_netns(fd: BorrowedFd<'_>) -> bool {
    if !on_nsfs(fd) {
        return false;
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the namespace
    // type of `fd`, a valid descriptor borrowed for this call on nsfs.
    #[allow(unsafe_code)]
    let nstype = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) };
    nstype == libc::CLONE_NEWNET
}

/// Creates `/run/netns` and makes it a shared mount point, as iproute2 does,
/// so namespaces mounted later propagate into mount namespaces (containers)
/// that bind it. Done once per process.
fn make_run_dir_shared() -> std::io::Result<()> {
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_RUN_DIR)?;
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if let Err(nix::Error::EINVAL) = make_shared() {
        // Not a mount point yet: bind it onto itself first.
        mount(
            Some(NETNS_RUN_DIR),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
        make_shared()?;
    }
    // Other errors (e.g. read-only /run): keep going, the bind mount of a
    // namespace works on a private mount too.
    *done = true;
    Ok(())
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

    /// How NSM's Go components (grpcfd) pass a namespace: an O_PATH fd.
    #[test]
    fn an_o_path_fd_of_a_netns_is_taken_as_grpcfd_sends_it() {
        use std::os::unix::fs::OpenOptionsExt;
        let path_fd = |p: &Path| -> OwnedFd {
            File::options()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(p)
                .unwrap()
                .into()
        };
        let ns = Netns::from_fd(path_fd(Path::new("/proc/thread-self/ns/net")), "o_path")
            .unwrap_or_else(|e| panic!("an O_PATH netns fd: {e}"));
        assert_eq!(ns.id(), Netns::current().unwrap().id());
        // Usable: a thread enters it.
        assert_eq!(ns.run(|| 7).unwrap(), 7);

        // An O_PATH fd of anything else is refused, a FIFO without opening it.
        let dir = std::env::temp_dir().join(format!("netns-opath-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for p in [fifo.as_path(), Path::new("/proc/thread-self/ns/uts")] {
            let e = Netns::from_fd(path_fd(p), "other").unwrap_err();
            assert!(
                matches!(e, NetnsError::NotNetns { .. }),
                "{}: {e}",
                p.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            Netns::open("no-such-ns-4242"),
            Err(NetnsError::NotFound { .. })
        ));
        assert!(matches!(Netns::open("a b"), Err(NetnsError::BadName(_))));
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
        let inner = ns
            .run(|| Netns::current().map(|n| n.id()))
            .unwrap()
            .unwrap();
        assert_eq!(inner, before);
        assert_eq!(Netns::current().unwrap().id(), before);
    }
}
