//! `FdStream`: a tokio `UnixStream` whose writes carry queued fds and whose
//! reads collect arriving fds, exactly as grpcfd's `connWrap` does.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, recvmsg, sendmsg};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

use super::channel::FdChannel;

/// grpcfd sends at most this many fds per write, one payload byte each.
pub const MAX_FDS_PER_WRITE: usize = 64;
/// Room for this many fds per read; the kernel closes any beyond it (MSG_CTRUNC).
const MAX_FDS_PER_READ: usize = 64;
/// Linux UIO_MAXIOV.
const MAX_IOV: usize = 1024;

/// One unix connection with its [`FdChannel`].
///
/// Implements `AsyncRead`/`AsyncWrite` for tonic/hyper and tonic's
/// `Connected` (the connect info is the `FdChannel`). Dropping it ends the
/// connection: unsent fds are closed, waiters give up; fds that arrived stay
/// with the remaining `FdChannel` handles.
pub struct FdStream {
    io: UnixStream,
    channel: FdChannel,
    cmsg: Vec<u8>,
    /// The server's connection slot this stream holds, if it counts them.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl FdStream {
    pub fn new(io: UnixStream) -> Self {
        Self::with_channel(io, FdChannel::new())
    }

    /// Uses a channel made beforehand (e.g. one with another fd bound).
    pub fn with_channel(io: UnixStream, channel: FdChannel) -> Self {
        Self {
            io,
            channel,
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]),
            _slot: None,
        }
    }

    /// Holds `slot` for as long as the stream lives (see [`super::incoming_limited`]).
    pub fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }

    pub fn channel(&self) -> &FdChannel {
        &self.channel
    }

    pub fn get_ref(&self) -> &UnixStream {
        &self.io
    }

    /// One non-blocking write: up to [`MAX_FDS_PER_WRITE`] queued fds, each on
    /// one byte of `bufs`, then as much of the rest as the socket takes.
    /// Returns the bytes written; an fd leaves the queue only once the kernel
    /// has accepted its byte, so nothing is lost, duplicated or re-sent.
    fn write_once(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let bufs = &bufs[..bufs.len().min(MAX_IOV)];
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let sock = self.io.as_raw_fd();
        let mut written = 0;
        {
            let mut state = self.channel.lock();
            let mut bytes = bufs.iter().flat_map(|b| b.iter().copied());
            while written < MAX_FDS_PER_WRITE {
                let Some(fd) = state.outgoing.front() else {
                    break;
                };
                let Some(byte) = bytes.next() else { break };
                let rights = [fd.as_raw_fd()];
                let sent = retry_eintr(|| {
                    sendmsg::<UnixAddr>(
                        sock,
                        &[IoSlice::new(&[byte])],
                        &[ControlMessage::ScmRights(&rights)],
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                });
                match sent {
                    Ok(1) => {
                        // The in-flight message holds its own reference: close our dup.
                        state.outgoing.pop_front();
                        FdChannel::note_sent(&mut state);
                        written += 1;
                    }
                    // Nothing went out, so the fd did not either; it stays queued.
                    Ok(_) if written > 0 => return Ok(written),
                    Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
                    // Report progress; the error recurs on the next call.
                    Err(_) if written > 0 => return Ok(written),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if written == total {
            return Ok(written);
        }
        let rest = skip_bytes(bufs, written);
        match retry_eintr(|| sendmsg::<UnixAddr>(sock, &rest, &[], MsgFlags::MSG_NOSIGNAL, None)) {
            Ok(n) => Ok(written + n),
            Err(_) if written > 0 => Ok(written),
            Err(e) => Err(e.into()),
        }
    }
}

/// One non-blocking read into `dst`, indexing any fds that came with it.
fn read_with(
    sock: RawFd,
    channel: &FdChannel,
    cmsg: &mut [u8],
    dst: &mut [u8],
) -> io::Result<usize> {
    // Zeroed so the hand parser below sees where the kernel's messages end.
    cmsg.fill(0);
    let mut iov = [IoSliceMut::new(dst)];
    let (n, truncated) = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut *cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => break (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // Adopt every installed fd first, so none can leak.
    let fds: Vec<OwnedFd> = scm_rights(cmsg).into_iter().map(adopt).collect();
    if truncated {
        tracing::warn!(
            "grpcfd: peer sent more fds in one message than we take; the kernel closed the rest"
        );
    }
    for fd in fds {
        channel.deliver(fd);
    }
    Ok(n)
}

/// The fds in the SCM_RIGHTS messages of a control buffer that was zeroed
/// before recvmsg. Parsed by hand (kernel ABI: `cmsghdr { size_t len; int
/// level; int type; }`, data and next header aligned to `size_t`) because
/// nix refuses to parse a truncated (MSG_CTRUNC) buffer, yet the fds that did
/// fit are installed in our table and ours to close.
fn scm_rights(cmsg: &[u8]) -> Vec<RawFd> {
    const WORD: usize = std::mem::size_of::<usize>();
    const INT: usize = std::mem::size_of::<i32>();
    const HDR: usize = WORD + 2 * INT;
    let align = |n: usize| n.div_ceil(WORD) * WORD;
    let int_at = |at: usize| i32::from_ne_bytes(cmsg[at..at + INT].try_into().expect("INT bytes"));
    let mut fds = Vec::new();
    let mut off = 0;
    while off + HDR <= cmsg.len() {
        let len = usize::from_ne_bytes(cmsg[off..off + WORD].try_into().expect("WORD bytes"));
        if len < HDR || len > cmsg.len() - off {
            break; // zeroed tail: no more messages
        }
        let (level, kind) = (int_at(off + WORD), int_at(off + WORD + INT));
        if level == nix::libc::SOL_SOCKET && kind == nix::libc::SCM_RIGHTS {
            let data = &cmsg[off + align(HDR)..off + len];
            fds.extend(
                data.chunks_exact(INT)
                    .map(|c| i32::from_ne_bytes(c.try_into().expect("INT bytes"))),
            );
        }
        off += align(len);
    }
    fds
}

/// Takes ownership of an fd the kernel just installed for us via SCM_RIGHTS.
#[allow(unsafe_code)]
fn adopt(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` comes from the SCM_RIGHTS control message of a recvmsg that
    // just succeeded: the kernel installed it in our fd table for this call, and
    // nothing else in the process knows or owns it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// `bufs` without its first `n` bytes.
fn skip_bytes<'a>(bufs: &'a [IoSlice<'a>], mut n: usize) -> Vec<IoSlice<'a>> {
    let mut rest = Vec::with_capacity(bufs.len());
    for b in bufs {
        if n >= b.len() {
            n -= b.len();
            continue;
        }
        rest.push(IoSlice::new(&b[n..]));
        n = 0;
    }
    rest
}

impl Drop for FdStream {
    fn drop(&mut self) {
        self.channel.close();
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.io.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            let FdStream {
                io, channel, cmsg, ..
            } = &mut *this;
            let sock = io.as_raw_fd();
            let res = io.try_io(Interest::READABLE, || read_with(sock, channel, cmsg, dst));
            match res {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            ready!(this.io.poll_write_ready(cx))?;
            match this.io.try_io(Interest::WRITABLE, || this.write_once(bufs)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return Poll::Ready(res),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for FdStream {
    type ConnectInfo = FdChannel;

    fn connect_info(&self) -> FdChannel {
        self.channel.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpcfd::inode_url_of;
    use std::os::fd::AsFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pipes(n: usize) -> Vec<(OwnedFd, OwnedFd)> {
        (0..n).map(|_| nix::unistd::pipe().expect("pipe")).collect()
    }

    fn pair(max_held: usize) -> (FdStream, FdStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (
            FdStream::new(a),
            FdStream::with_channel(b, FdChannel::with_max_held(max_held)),
        )
    }

    #[tokio::test]
    async fn each_fd_rides_on_one_byte_and_the_bytes_arrive_intact() {
        let (mut tx, mut rx) = pair(200);
        let ps = pipes(100);
        for (r, _) in &ps {
            tx.channel().send_fd(r.as_fd()).unwrap();
        }
        let data: Vec<u8> = (0..410u32).map(|i| (i % 251) as u8).collect();
        // 10 bytes carry 10 fds; 300 bytes carry 64 (the per-write cap); the last 100 carry 26.
        tx.write_all(&data[..10]).await.unwrap();
        assert_eq!(tx.channel().stats().queued, 90);
        tx.write_all(&data[10..310]).await.unwrap();
        assert_eq!(tx.channel().stats().queued, 26);
        tx.write_all(&data[310..]).await.unwrap();
        tx.shutdown().await.unwrap();
        assert_eq!(tx.channel().stats().sent, 100);

        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        let s = rx.channel().stats();
        assert_eq!((s.arrived, s.held, s.duplicates), (100, 100, 0));
        for (r, _) in &ps {
            let url = inode_url_of(r.as_fd()).unwrap();
            assert!(
                rx.channel().try_recv_fd(&url).unwrap().is_some(),
                "{url} missing"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_socket_buffers_lose_or_repeat_neither_bytes_nor_fds() {
        const CHUNK: usize = 64 * 1024;
        const CHUNKS: usize = 96;
        let (mut tx, mut rx) = pair(CHUNKS);
        let ps = pipes(CHUNKS);
        let urls: Vec<_> = ps
            .iter()
            .map(|(r, _)| inode_url_of(r.as_fd()).unwrap())
            .collect();
        let pattern = |i: usize| (i % 251) as u8;
        let writer = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            for (c, (r, _)) in ps.iter().enumerate() {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = pattern(c * CHUNK + j);
                }
                // Queued while earlier writes may still be Pending on a full socket.
                tx.channel().send_fd(r.as_fd()).unwrap();
                tx.write_all(&buf).await.unwrap();
            }
            tx.shutdown().await.unwrap();
            tx.channel().stats()
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 1500];
        loop {
            let n = rx.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (j, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got + j), "byte {} differs", got + j);
            }
            got += n;
            if got.is_multiple_of(7) {
                tokio::task::yield_now().await; // let the writer hit a full buffer
            }
        }
        assert_eq!(got, CHUNK * CHUNKS);
        let sent = writer.await.unwrap();
        assert_eq!((sent.sent, sent.queued), (CHUNKS as u64, 0));
        let s = rx.channel().stats();
        assert_eq!(
            (s.arrived, s.held, s.duplicates),
            (CHUNKS as u64, CHUNKS, 0)
        );
        for url in &urls {
            assert!(
                rx.channel().try_recv_fd(url).unwrap().is_some(),
                "{url} missing"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_fd_batch_is_adopted_up_to_the_buffer_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut rx = FdStream::with_channel(b, FdChannel::with_max_held(1000));
        let ps = pipes(100);
        let raw: Vec<RawFd> = ps.iter().map(|(r, _)| r.as_raw_fd()).collect();
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(a);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"x");
        // The kernel truncated the batch: the fds that fit are ours (held, closed
        // with the channel), the rest were closed by the kernel.
        let s = rx.channel().stats();
        assert_eq!(
            (s.arrived, s.held),
            (MAX_FDS_PER_READ as u64, MAX_FDS_PER_READ)
        );
    }

    #[tokio::test]
    async fn a_reader_without_a_control_buffer_gets_every_byte_and_no_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = FdStream::new(a);
        let ps = pipes(5);
        let mut write_ends = Vec::new();
        for (r, w) in ps {
            tx.channel().send_fd(r.as_fd()).unwrap();
            write_ends.push(w); // `r` closes here: only the queued dup remains
        }
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        drop(tx);
        // Plain read(2), as a gRPC peer without grpcfd does.
        let mut plain = b.into_std().unwrap();
        plain.set_nonblocking(false).unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut plain, &mut got).unwrap();
            got
        })
        .await
        .unwrap();
        assert_eq!(got, data);
        // The kernel closed the fds that rode along: every pipe lost its last reader.
        for w in &write_ends {
            assert_eq!(nix::unistd::write(w, b"x"), Err(Errno::EPIPE));
        }
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_unsent_fds() {
        let (tx, _rx) = pair(8);
        let (r, w) = nix::unistd::pipe().unwrap();
        tx.channel().send_fd(r.as_fd()).unwrap();
        drop(r);
        let ch = tx.channel().clone();
        drop(tx);
        assert!(ch.is_closed());
        assert_eq!(ch.stats().queued, 0);
        // With every read end closed, writing to the pipe fails with EPIPE.
        assert_eq!(nix::unistd::write(&w, b"x"), Err(Errno::EPIPE));
    }
}
