//! The per-connection fd store: fds queued to go out with the next write, fds
//! that arrived (indexed by inode), and the waiters for them.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::GrpcfdError;
use crate::inode::InodeUrl;

/// Default bound on fds held per connection, so a peer cannot fill our fd table.
/// grpcfd itself sends at most 64 fds per write; an NSM Request carries one or two.
pub const DEFAULT_MAX_HELD_FDS: usize = 64;

/// The fd side channel of one unix connection (grpcfd's `FDTransceiver`).
///
/// Cheap to clone; every clone talks to the same connection. Received fds stay
/// available after the connection ends and are closed when the connection and
/// every handle are gone.
#[derive(Clone)]
pub struct FdChannel {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken on every arrival and on close; waiters re-check the state.
    changed: Notify,
}

#[derive(Default)]
pub(super) struct State {
    /// Dups waiting for the next write, oldest first.
    pub(super) outgoing: VecDeque<OwnedFd>,
    received: HashMap<InodeUrl, OwnedFd>,
    max_held: usize,
    closed: bool,
    stats: FdStats,
}

/// Counters of one connection, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdStats {
    /// Fds queued by [`FdChannel::send_fd`] and not yet written.
    pub queued: usize,
    /// Distinct received fds held now.
    pub held: usize,
    /// Fds written to the peer.
    pub sent: u64,
    /// Fds that arrived (before de-duplication and the bound).
    pub arrived: u64,
    /// Arrived fds closed because one with the same inode was already held.
    pub duplicates: u64,
    /// Arrived fds closed because [`FdChannel::max_held`] fds were already held.
    pub rejected: u64,
}

impl Default for FdChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FdChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdChannel")
            .field("stats", &self.stats())
            .finish()
    }
}

impl FdChannel {
    /// A channel holding at most [`DEFAULT_MAX_HELD_FDS`] received fds.
    pub fn new() -> Self {
        Self::with_max_held(DEFAULT_MAX_HELD_FDS)
    }

    /// A channel holding at most `max_held` received fds; later distinct arrivals are closed.
    pub fn with_max_held(max_held: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    max_held,
                    ..State::default()
                }),
                changed: Notify::new(),
            }),
        }
    }

    /// Dups `fd`, queues it to go out with the next write on this connection; returns its inode URL (fstat st_dev/st_ino).
    pub fn send_fd(&self, fd: BorrowedFd<'_>) -> io::Result<InodeUrl> {
        let url = inode_url_of(fd)?;
        // Our own dup (close-on-exec): the caller may close theirs before the next write.
        let dup = fd.try_clone_to_owned()?;
        let mut state = self.lock();
        if state.closed {
            return Err(GrpcfdError::Closed.into());
        }
        state.outgoing.push_back(dup);
        Ok(url)
    }

    /// Waits until an fd with this inode URL has arrived on this connection (returns a dup; timeout → io::ErrorKind::TimedOut).
    ///
    /// Fails with [`io::ErrorKind::ConnectionAborted`] once the connection has
    /// ended without delivering it.
    pub async fn recv_fd(&self, url: &InodeUrl, timeout: Duration) -> io::Result<OwnedFd> {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                // Register before looking, so an arrival in between still wakes us.
                changed.as_mut().enable();
                if let Some(fd) = self.lookup(url, true)? {
                    return Ok(fd);
                }
                changed.await;
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(res) => res,
            Err(_) => Err(GrpcfdError::Timeout { url: *url, timeout }.into()),
        }
    }

    /// A dup of the fd with this inode URL if it has already arrived.
    pub fn try_recv_fd(&self, url: &InodeUrl) -> io::Result<Option<OwnedFd>> {
        self.lookup(url, false)
    }

    /// Closes the held fd with this inode URL (freeing a slot of the bound); true if one was held.
    pub fn release_fd(&self, url: &InodeUrl) -> bool {
        let removed = self.lock().received.remove(url);
        removed.is_some()
    }

    /// Whether the connection has ended (nothing more can be sent or received).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The bound on held received fds.
    pub fn max_held(&self) -> usize {
        self.lock().max_held
    }

    pub fn stats(&self) -> FdStats {
        let state = self.lock();
        FdStats {
            queued: state.outgoing.len(),
            held: state.received.len(),
            ..state.stats
        }
    }

    fn lookup(&self, url: &InodeUrl, fail_if_closed: bool) -> io::Result<Option<OwnedFd>> {
        let state = self.lock();
        match state.received.get(url) {
            // Always hand out a dup: the caller may close it, others may ask again.
            Some(fd) => fd.try_clone().map(Some),
            None if fail_if_closed && state.closed => {
                Err(GrpcfdError::ClosedBeforeArrival(*url).into())
            }
            None => Ok(None),
        }
    }

    /// Locks the state (the writer sends queued fds under this lock).
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a
        // way that matters more than losing the connection, so keep going.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Indexes an fd that arrived on the connection; wakes its waiters.
    pub(super) fn deliver(&self, fd: OwnedFd) {
        let url = match inode_url_of(fd.as_fd()) {
            Ok(url) => url,
            Err(e) => {
                tracing::warn!(error = %e, "grpcfd: cannot fstat a received fd; closing it");
                return;
            }
        };
        {
            let mut state = self.lock();
            state.stats.arrived += 1;
            if state.received.contains_key(&url) {
                state.stats.duplicates += 1;
                return; // `fd` closes here: we already hold this file.
            }
            if state.received.len() >= state.max_held {
                state.stats.rejected += 1;
                tracing::warn!(
                    %url,
                    max_held = state.max_held,
                    "grpcfd: peer sent more fds than this connection holds; closing the new one"
                );
                return;
            }
            state.received.insert(url, fd);
        }
        self.shared.changed.notify_waiters();
    }

    /// Counts an fd the writer has handed to the kernel.
    pub(super) fn note_sent(state: &mut State) {
        state.stats.sent += 1;
    }

    /// The connection is gone: queued fds can never be sent, so close them now;
    /// waiters for fds that did not arrive give up.
    pub(super) fn close(&self) {
        let unsent = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.outgoing)
        };
        drop(unsent);
        self.shared.changed.notify_waiters();
    }
}

/// `inode://<st_dev>/<st_ino>` of an open file (grpcfd's `FDToURL`).
pub fn inode_url_of(fd: BorrowedFd<'_>) -> io::Result<InodeUrl> {
    let st = nix::sys::stat::fstat(fd)?;
    // dev_t/ino_t are u64 on Linux targets we build for, not on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok(InodeUrl::new(st.st_dev as u64, st.st_ino as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, Write};

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().expect("pipe")
    }

    #[test]
    fn send_fd_reports_the_inode_and_queues_a_dup() {
        let ch = FdChannel::new();
        let (r, _w) = pipe();
        let url = ch.send_fd(r.as_fd()).unwrap();
        assert_eq!(url, inode_url_of(r.as_fd()).unwrap());
        drop(r); // the queued dup keeps the pipe end open
        let queued = ch.lock().outgoing.pop_front().unwrap();
        assert_eq!(inode_url_of(queued.as_fd()).unwrap(), url);
    }

    #[test]
    fn duplicate_arrivals_are_closed_and_counted() {
        let ch = FdChannel::new();
        let (r, _w) = pipe();
        ch.deliver(r.try_clone().unwrap());
        ch.deliver(r.try_clone().unwrap());
        let s = ch.stats();
        assert_eq!((s.arrived, s.held, s.duplicates), (2, 1, 1));
    }

    #[test]
    fn held_fds_are_bounded() {
        let ch = FdChannel::with_max_held(3);
        let pipes: Vec<_> = (0..5).map(|_| pipe()).collect();
        for (r, _) in &pipes {
            ch.deliver(r.try_clone().unwrap());
        }
        let s = ch.stats();
        assert_eq!((s.held, s.rejected), (3, 2));
        let first = inode_url_of(pipes[0].0.as_fd()).unwrap();
        let last = inode_url_of(pipes[4].0.as_fd()).unwrap();
        assert!(ch.try_recv_fd(&first).unwrap().is_some());
        assert!(ch.try_recv_fd(&last).unwrap().is_none());
        // Releasing one frees a slot.
        assert!(ch.release_fd(&first));
        ch.deliver(pipes[4].0.try_clone().unwrap());
        assert!(ch.try_recv_fd(&last).unwrap().is_some());
    }

    #[tokio::test]
    async fn recv_fd_waits_for_the_arrival_and_returns_a_dup_of_the_same_file() {
        let ch = FdChannel::new();
        let mut tmp = tempfile_in_target();
        tmp.write_all(b"payload").unwrap();
        let url = inode_url_of(tmp.as_fd()).unwrap();
        let deliverer = ch.clone();
        let fd: OwnedFd = tmp.try_clone().unwrap().into();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            deliverer.deliver(fd);
        });
        let got = ch.recv_fd(&url, Duration::from_secs(5)).await.unwrap();
        let mut f = File::from(got);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "payload");
    }

    #[tokio::test]
    async fn recv_fd_times_out_with_timed_out() {
        let ch = FdChannel::new();
        let err = ch
            .recv_fd(&InodeUrl::new(1, 2), Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("inode://1/2"), "{err}");
    }

    #[tokio::test]
    async fn close_wakes_waiters_but_keeps_what_arrived() {
        let ch = FdChannel::new();
        let (r, _w) = pipe();
        let have = inode_url_of(r.as_fd()).unwrap();
        ch.deliver(r);
        let closer = ch.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            closer.close();
        });
        let err = ch
            .recv_fd(&InodeUrl::new(1, 2), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(ch.recv_fd(&have, Duration::ZERO).await.is_ok());
        let (r2, _w2) = pipe();
        assert_eq!(
            ch.send_fd(r2.as_fd()).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
    }

    /// An unlinked temp file without a tempfile dependency.
    fn tempfile_in_target() -> File {
        let path = std::env::temp_dir().join(format!(
            "grpcfd-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
