//! nf_tables over a netlink socket: send one batch and read the acks, and
//! dump our table's chains and rules for verify. The socket must be opened on
//! a thread inside the target namespace ([`crate::netns::Netns::run`]); it
//! stays bound to that namespace. Requests and replies are (de)serialised here
//! in safe Rust; libnftnl only builds the batch.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

use libc::{
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFPROTO_INET,
    NFT_MSG_DELSETELEM, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE, NFT_MSG_NEWSETELEM, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR,
};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

// nf_tables attribute numbers (linux/netfilter/nf_tables.h).
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// Elements per set-element message (about 8 KiB each).
const ELEMENTS_PER_MESSAGE: usize = 256;
/// libnftnl's TLV type for a rule comment in NFTA_RULE_USERDATA.
const UDATA_RULE_COMMENT: u8 = 0;

/// Receive buffer: netlink dumps fill at most 32 KiB per datagram.
const RECV_BUF: usize = 64 * 1024;

/// A chain as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelChain {
    pub name: String,
    /// `(type, hooknum, priority)` for base chains.
    pub base: Option<(String, u32, i32)>,
}

/// A rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelRule {
    pub chain: String,
    pub handle: u64,
    pub comment: Option<String>,
    /// Expression names, for describing rules that are not ours.
    pub exprs: Vec<String>,
}

/// A set as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelSet {
    pub name: String,
    /// nft's datatype number of the key (e.g. 41 = ifname) and its length.
    pub key_type: u32,
    pub key_len: u32,
}

/// Why a batch failed: `index` is the position of the refused object among
/// those added to the batch (begin/end markers excluded), when known.
#[derive(Debug)]
pub(crate) struct BatchError {
    pub index: Option<usize>,
    pub error: io::Error,
}

fn msg_type(cmd: i32) -> u16 {
    ((NFNL_SUBSYS_NFTABLES << 8) | cmd) as u16
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// nlmsghdr + nfgenmsg (family inet, version 0, res_id 0) + attributes.
fn request(cmd: i32, flags: i32, seq: u32, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut buf = vec![0u8; NLMSG_HDRLEN];
    buf.extend_from_slice(&[NFPROTO_INET as u8, 0, 0, 0]);
    for (ty, data) in attrs {
        push_attr(&mut buf, *ty, data);
    }
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&msg_type(cmd).to_ne_bytes());
    buf[6..8].copy_from_slice(&((NLM_F_REQUEST | flags) as u16).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    buf
}

struct Msg<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink reply: {what}"),
    )
}

fn messages(mut buf: &[u8]) -> io::Result<Vec<Msg<'_>>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("message length"));
        }
        out.push(Msg {
            ty: u16_at(buf, 4),
            seq: u32_at(buf, 8),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    Ok(out)
}

fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16_at(buf, 0));
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((u16_at(buf, 2) & NLA_TYPE_MASK, &buf[4..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

fn attr_str(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn be32(data: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(..4)?.try_into().ok()?))
}

/// The errno of an NLMSG_ERROR message (0 = ack).
fn error_code(m: &Msg<'_>) -> io::Result<i32> {
    if m.payload.len() < 4 {
        return Err(bad("short error message"));
    }
    Ok(i32::from_ne_bytes(
        m.payload[..4].try_into().expect("4 bytes"),
    ))
}

/// A netfilter netlink socket. It belongs to the namespace of the thread
/// that opened it for its whole life (and keeps that namespace alive), so
/// any thread may use it afterwards.
pub(crate) struct NlSocket(OwnedFd);

/// Opens a netfilter netlink socket in the calling thread's namespace.
pub(crate) fn open() -> io::Result<NlSocket> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    // Port id 0: the kernel picks one.
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(NlSocket(fd))
}

impl NlSocket {
    /// Sends one datagram to the kernel (an unconnected netlink socket
    /// sends to port 0, the kernel).
    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            match send(self.0.as_raw_fd(), bytes, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match recv(self.0.as_raw_fd(), buf, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// Raises the send buffer to `bytes`, so a large batch still reaches the
    /// kernel in one datagram (as nft does for large rulesets):
    /// `SO_SNDBUFFORCE` (needs CAP_NET_ADMIN, as writing rules does), else
    /// `SO_SNDBUF` (capped by `net.core.wmem_max`).
    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        setsockopt(&self.0, sockopt::SndBufForce, &bytes)
            .or_else(|_| setsockopt(&self.0, sockopt::SndBuf, &bytes))
            .map_err(io::Error::from)
    }
}

/// Largest transaction that fits the default netlink send buffer; a larger
/// one gets a larger buffer first, since a batch must reach the kernel in
/// one piece.
const DEFAULT_BATCH: usize = 192 * 1024;

/// Largest transaction we send at all (a table for thousands of interfaces
/// is a few MiB).
const MAX_BATCH: usize = 64 * 1024 * 1024;

/// Sends a finalised batch as one datagram and waits for the outcome. The
/// kernel applies the batch as one transaction: on any error nothing of it
/// remains.
///
/// nftnl asks for an ack of every message, which costs one `recvmsg` each.
/// Errors are reported whether or not an ack was asked for, and the kernel
/// reports everything in message order after processing the whole batch, so
/// only the last object (and the end marker, which kernels ≥ 6.10 ack) keep
/// their ack flag: an error of any message arrives before those acks.
pub(crate) fn send_batch(
    sock: &NlSocket,
    batch: &nftnl::FinalizedBatch,
    objects: usize,
) -> Result<(), BatchError> {
    let bytes: Vec<u8> = batch.iter().flatten().copied().collect();
    let seqs = batch.sequence_numbers();
    // Kernels ≥ 6.10 also ack the begin/end markers (nftnl numbers them).
    let markers_acked = seqs.len() == objects + 2;
    let first_object = if markers_acked {
        seqs.start + 1
    } else {
        seqs.start
    };
    send_numbered(
        sock,
        bytes,
        first_object,
        objects,
        markers_acked.then(|| seqs.end - 1),
    )
}

/// Sends a batch whose objects are numbered from `first_object` (the end
/// marker as `end_marker` when it asks for an ack) and waits for the outcome.
fn send_numbered(
    sock: &NlSocket,
    mut bytes: Vec<u8>,
    first_object: u32,
    objects: usize,
    end_marker: Option<u32>,
) -> Result<(), BatchError> {
    let plain = |error| BatchError { index: None, error };
    if bytes.len() > MAX_BATCH {
        return Err(plain(io::Error::other(format!(
            "transaction of {} bytes is larger than {MAX_BATCH}",
            bytes.len()
        ))));
    }
    if bytes.len() > DEFAULT_BATCH {
        // The kernel refuses a datagram above the buffer less a little.
        sock.set_send_buffer(bytes.len() + 64 * 1024).map_err(|e| {
            plain(io::Error::new(
                e.kind(),
                format!(
                    "cannot raise the netlink send buffer for a transaction of {} bytes: {e}",
                    bytes.len()
                ),
            ))
        })?;
    }
    let last_object = first_object + objects as u32 - 1;
    let mut awaited = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= bytes.len() {
        let len = u32_at(&bytes, off) as usize;
        if len < NLMSG_HDRLEN {
            return Err(plain(bad("batch message length")));
        }
        let seq = u32_at(&bytes, off + 8);
        let mut flags = u16_at(&bytes, off + 6);
        if flags & NLM_F_ACK as u16 != 0 {
            if seq == last_object || end_marker == Some(seq) {
                awaited.push(seq);
            } else {
                flags &= !(NLM_F_ACK as u16);
                bytes[off + 6..off + 8].copy_from_slice(&flags.to_ne_bytes());
            }
        }
        off += len.next_multiple_of(4);
    }
    if sock.send(&bytes).map_err(plain)? < bytes.len() {
        return Err(plain(io::Error::other("netlink send was cut short")));
    }
    let mut buf = vec![0u8; RECV_BUF];
    while !awaited.is_empty() {
        let n = sock.recv(&mut buf).map_err(plain)?;
        for m in messages(&buf[..n]).map_err(plain)? {
            if i32::from(m.ty) != NLMSG_ERROR {
                continue;
            }
            let code = error_code(&m).map_err(plain)?;
            if code != 0 {
                let index = m
                    .seq
                    .checked_sub(first_object)
                    .map(|i| i as usize)
                    .filter(|&i| i < objects);
                return Err(BatchError {
                    index,
                    error: io::Error::from_raw_os_error(-code),
                });
            }
            awaited.retain(|&s| s != m.seq);
        }
    }
    Ok(())
}

/// What one message of a set-element transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ElementOp {
    /// Adds elements; one already there is no error (no NLM_F_EXCL).
    Add,
    Delete,
}

fn nested(ty: u16, inner: &[u8]) -> (u16, Vec<u8>) {
    (ty | NLA_F_NESTED, inner.to_vec())
}

fn attr_bytes(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (ty, data) in attrs {
        push_attr(&mut buf, *ty, data);
    }
    buf
}

/// A batch begin/end marker for the nf_tables subsystem (`res_id` in
/// network order, as nft sends it).
fn marker(ty: i32, seq: u32) -> Vec<u8> {
    let mut buf = vec![0u8; NLMSG_HDRLEN];
    buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    buf.extend_from_slice(&(NFNL_SUBSYS_NFTABLES as u16).to_be_bytes());
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&(ty as u16).to_ne_bytes());
    buf[6..8].copy_from_slice(&(NLM_F_REQUEST as u16).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    buf
}

/// One transaction of set-element messages on set `set` of table
/// `inet <table>`, built here (libnftnl always adds with NLM_F_EXCL). Each
/// `(op, keys)` becomes one or more messages; a refused one is reported by
/// the index of its `(op, keys)` entry. Only the last message asks for an
/// ack: an error of any other arrives before it.
pub(crate) fn send_elements(
    sock: &NlSocket,
    table: &str,
    set: &str,
    ops: &[(ElementOp, Vec<Vec<u8>>)],
) -> Result<(), BatchError> {
    const FIRST: u32 = 1;
    let mut msgs: Vec<(i32, i32, Vec<u8>)> = Vec::new();
    // Message number → entry of `ops`.
    let mut entry_of: Vec<usize> = Vec::new();
    for (i, (op, keys)) in ops.iter().enumerate() {
        for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
            let mut list = Vec::new();
            for key in chunk {
                let value = attr_bytes(&[(NFTA_DATA_VALUE, key.clone())]);
                let elem_key = attr_bytes(&[nested(NFTA_SET_ELEM_KEY, &value)]);
                push_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem_key);
            }
            let attrs = attr_bytes(&[
                (NFTA_SET_ELEM_LIST_TABLE, cstr(table)),
                (NFTA_SET_ELEM_LIST_SET, cstr(set)),
                nested(NFTA_SET_ELEM_LIST_ELEMENTS, &list),
            ]);
            let (cmd, flags) = match op {
                ElementOp::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE),
                ElementOp::Delete => (NFT_MSG_DELSETELEM, 0),
            };
            msgs.push((cmd, flags, attrs));
            entry_of.push(i);
        }
    }
    if msgs.is_empty() {
        return Ok(());
    }
    let objects = msgs.len();
    let mut bytes = marker(NFNL_MSG_BATCH_BEGIN, 0);
    for (n, (cmd, flags, attrs)) in msgs.iter().enumerate() {
        let seq = FIRST + n as u32;
        let ack = if n + 1 == objects { NLM_F_ACK } else { 0 };
        let mut m = request(*cmd, flags | ack, seq, &[]);
        m.extend_from_slice(attrs);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        bytes.extend_from_slice(&m);
    }
    bytes.extend_from_slice(&marker(NFNL_MSG_BATCH_END, 0));
    send_numbered(sock, bytes, FIRST, objects, None).map_err(|e| BatchError {
        index: e.index.map(|i| entry_of[i]),
        error: e.error,
    })
}

/// Sends `req` and collects the payloads of the reply messages until the
/// dump ends (or the ack of a non-dump request arrives).
fn transact(sock: &NlSocket, req: &[u8], seq: u32) -> io::Result<Vec<Vec<u8>>> {
    sock.send(req)?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Vec::new();
    loop {
        let n = sock.recv(&mut buf)?;
        for m in messages(&buf[..n])? {
            if m.seq != seq {
                continue;
            }
            match i32::from(m.ty) {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = error_code(&m)?;
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(out);
                }
                _ => out.push(m.payload.to_vec()),
            }
        }
    }
}

/// Sequence number of queries; batches number their messages from 1.
const SEQ: u32 = 0x5eed_0000;

/// Whether table `inet <name>` exists.
pub(crate) fn table_exists(sock: &NlSocket, name: &str) -> io::Result<bool> {
    let req = request(
        NFT_MSG_GETTABLE,
        NLM_F_ACK,
        SEQ,
        &[(NFTA_TABLE_NAME, cstr(name))],
    );
    match transact(sock, &req, SEQ) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The chains of table `inet <table>`.
pub(crate) fn dump_chains(sock: &NlSocket, table: &str) -> io::Result<Vec<KernelChain>> {
    let req = request(
        NFT_MSG_GETCHAIN,
        NLM_F_DUMP,
        SEQ,
        &[(NFTA_CHAIN_TABLE, cstr(table))],
    );
    let mut out = Vec::new();
    for payload in transact(sock, &req, SEQ)? {
        let (mut t, mut name, mut ty, mut hook) = (String::new(), String::new(), None, None);
        for (k, v) in attrs(payload.get(NFGENMSG_LEN..).unwrap_or_default()) {
            match k {
                NFTA_CHAIN_TABLE => t = attr_str(v),
                NFTA_CHAIN_NAME => name = attr_str(v),
                NFTA_CHAIN_TYPE => ty = Some(attr_str(v)),
                NFTA_CHAIN_HOOK => {
                    let (mut num, mut prio) = (None, None);
                    for (hk, hv) in attrs(v) {
                        match hk {
                            NFTA_HOOK_HOOKNUM => num = be32(hv),
                            NFTA_HOOK_PRIORITY => prio = be32(hv).map(|p| p as i32),
                            _ => {}
                        }
                    }
                    hook = num.zip(prio);
                }
                _ => {}
            }
        }
        if t != table {
            continue;
        }
        out.push(KernelChain {
            name,
            base: hook.map(|(n, p)| (ty.unwrap_or_default(), n, p)),
        });
    }
    Ok(out)
}

/// The rules of table `inet <table>`, in chain order.
pub(crate) fn dump_rules(sock: &NlSocket, table: &str) -> io::Result<Vec<KernelRule>> {
    let req = request(
        NFT_MSG_GETRULE,
        NLM_F_DUMP,
        SEQ,
        &[(NFTA_RULE_TABLE, cstr(table))],
    );
    let mut out = Vec::new();
    for payload in transact(sock, &req, SEQ)? {
        let mut rule = KernelRule {
            chain: String::new(),
            handle: 0,
            comment: None,
            exprs: Vec::new(),
        };
        let mut t = String::new();
        for (k, v) in attrs(payload.get(NFGENMSG_LEN..).unwrap_or_default()) {
            match k {
                NFTA_RULE_TABLE => t = attr_str(v),
                NFTA_RULE_CHAIN => rule.chain = attr_str(v),
                NFTA_RULE_HANDLE => {
                    rule.handle = v
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0)
                }
                NFTA_RULE_USERDATA => rule.comment = udata_comment(v),
                NFTA_RULE_EXPRESSIONS => {
                    for (ek, ev) in attrs(v) {
                        if ek != NFTA_LIST_ELEM {
                            continue;
                        }
                        if let Some((_, n)) =
                            attrs(ev).into_iter().find(|(k, _)| *k == NFTA_EXPR_NAME)
                        {
                            rule.exprs.push(attr_str(n));
                        }
                    }
                }
                _ => {}
            }
        }
        if t == table {
            out.push(rule);
        }
    }
    Ok(out)
}

/// The sets of table `inet <table>`.
pub(crate) fn dump_sets(sock: &NlSocket, table: &str) -> io::Result<Vec<KernelSet>> {
    let req = request(
        NFT_MSG_GETSET,
        NLM_F_DUMP,
        SEQ,
        &[(NFTA_SET_TABLE, cstr(table))],
    );
    let mut out = Vec::new();
    for payload in transact(sock, &req, SEQ)? {
        let mut t = String::new();
        let mut set = KernelSet {
            name: String::new(),
            key_type: 0,
            key_len: 0,
        };
        for (k, v) in attrs(payload.get(NFGENMSG_LEN..).unwrap_or_default()) {
            match k {
                NFTA_SET_TABLE => t = attr_str(v),
                NFTA_SET_NAME => set.name = attr_str(v),
                NFTA_SET_KEY_TYPE => set.key_type = be32(v).unwrap_or(0),
                NFTA_SET_KEY_LEN => set.key_len = be32(v).unwrap_or(0),
                _ => {}
            }
        }
        if t == table {
            out.push(set);
        }
    }
    Ok(out)
}

/// The keys of the elements of set `set` in table `inet <table>`.
pub(crate) fn dump_elements(sock: &NlSocket, table: &str, set: &str) -> io::Result<Vec<Vec<u8>>> {
    let req = request(
        NFT_MSG_GETSETELEM,
        NLM_F_DUMP,
        SEQ,
        &[
            (NFTA_SET_ELEM_LIST_TABLE, cstr(table)),
            (NFTA_SET_ELEM_LIST_SET, cstr(set)),
        ],
    );
    let mut out = Vec::new();
    for payload in transact(sock, &req, SEQ)? {
        for (k, v) in attrs(payload.get(NFGENMSG_LEN..).unwrap_or_default()) {
            if k != NFTA_SET_ELEM_LIST_ELEMENTS {
                continue;
            }
            for (ek, ev) in attrs(v) {
                if ek != NFTA_LIST_ELEM {
                    continue;
                }
                let key = attrs(ev)
                    .into_iter()
                    .find(|(k, _)| *k == NFTA_SET_ELEM_KEY)
                    .and_then(|(_, kv)| {
                        attrs(kv)
                            .into_iter()
                            .find(|(k, _)| *k == NFTA_DATA_VALUE)
                            .map(|(_, d)| d.to_vec())
                    });
                out.extend(key);
            }
        }
    }
    Ok(out)
}

/// The comment TLV of libnftnl rule user data (type u8, length u8, value).
fn udata_comment(mut data: &[u8]) -> Option<String> {
    while data.len() >= 2 {
        let (ty, len) = (data[0], usize::from(data[1]));
        let value = data.get(2..2 + len)?;
        if ty == UDATA_RULE_COMMENT {
            return Some(attr_str(value));
        }
        data = &data[2 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_and_parsing_round_trip() {
        let req = request(
            NFT_MSG_GETRULE,
            NLM_F_DUMP,
            7,
            &[(NFTA_RULE_TABLE, cstr("abc"))],
        );
        assert_eq!(req.len(), 16 + 4 + 8);
        let msgs = messages(&req).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 7);
        let a = attrs(&msgs[0].payload[4..]);
        assert_eq!(a, vec![(NFTA_RULE_TABLE, &b"abc\0"[..])]);
    }

    #[test]
    fn nested_attributes_round_trip() {
        let value = attr_bytes(&[(NFTA_DATA_VALUE, b"nsm-1\0".to_vec())]);
        let key = attr_bytes(&[nested(NFTA_SET_ELEM_KEY, &value)]);
        let mut list = Vec::new();
        push_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &key);
        let top = attrs(&list);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, NFTA_LIST_ELEM, "the nested flag is masked off");
        let inner = attrs(top[0].1);
        let data = attrs(inner[0].1);
        assert_eq!(data, vec![(NFTA_DATA_VALUE, &b"nsm-1\0"[..])]);
        let m = marker(NFNL_MSG_BATCH_BEGIN, 3);
        assert_eq!(m.len(), 20);
        assert_eq!(&m[18..20], &[0, NFNL_SUBSYS_NFTABLES as u8]);
    }

    #[test]
    fn comment_is_read_from_user_data() {
        let ud = [0u8, 5, b'a', b':', b'b', b'c', 0];
        assert_eq!(udata_comment(&ud).as_deref(), Some("a:bc"));
        assert_eq!(udata_comment(&[1, 1, 9]), None);
    }
}
