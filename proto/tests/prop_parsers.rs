//! Property tests of what `nsm-api` parses from callers: network service
//! URLs (`NSM_NETWORK_SERVICES`), `inode://` URLs (mechanism parameters), and
//! the grpcfd reader (bytes and SCM_RIGHTS fds a peer sends). Case counts are
//! bounded so the whole binary runs in seconds; no failure files are written.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg, setsockopt, sockopt};
use nsm_api::grpcfd::{DEFAULT_MAX_HELD_FDS, FdChannel, FdStream, MAX_FDS_PER_WRITE, inode_url_of};
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::validate_interface_name;
use nsm_api::nsurl::NsUrl;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- nsurl

/// Pieces that make strings look like network service URLs, so arbitrary
/// input reaches every branch of the parser, not only its first check.
fn url_ish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("kernel://".to_owned()),
        Just("://".to_owned()),
        Just("/".to_owned()),
        Just("?".to_owned()),
        Just("&".to_owned()),
        Just("=".to_owned()),
        Just("@".to_owned()),
        Just("+".to_owned()),
        Just(",".to_owned()),
        Just("%".to_owned()),
        Just("%2".to_owned()),
        Just("%2F".to_owned()),
        Just("%e2%82".to_owned()),
        Just("%zz".to_owned()),
        "[a-zA-Z0-9.-]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

/// Bytes a URL may carry as they are; everything else is percent-encoded.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// How a test encodes one component.
#[derive(Debug, Clone, Copy)]
struct Encoding {
    /// Every byte as `%XX`, not only the reserved ones.
    all: bool,
    /// `a-f` rather than `A-F` in escapes.
    lower: bool,
    /// A space as `+` rather than `%20`.
    plus: bool,
}

fn encoding() -> impl Strategy<Value = Encoding> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(all, lower, plus)| Encoding {
        all,
        lower,
        plus,
    })
}

fn percent_encode(s: &str, e: Encoding) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b == b' ' && e.plus {
            out.push('+');
        } else if unreserved(b) && !e.all {
            out.push(b as char);
        } else if e.lower {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Text without control characters (what a label may hold).
fn label_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9._~-]{0,10}",
        2 => "[ -~]{0,10}",
        2 => "\\PC{0,6}",
    ]
}

/// A valid interface name: 1-15 bytes, not `.`/`..`, no '/', ':', whitespace or control.
fn interface_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9._@%+?&=#-]{1,15}",
        1 => "[^/:\\s\\p{Cc}]{1,4}",
    ]
    .prop_filter("a valid interface name", |n| {
        validate_interface_name(n).is_ok()
    })
}

/// A network service name as the parser keeps it: no '/', '?', whitespace or control.
fn service_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9-]{1,12}(@[a-z0-9.]{1,12})?",
        1 => "[^/?\\s\\p{Cc}]{1,8}",
    ]
}

/// The parts of a network service URL and how they are written down.
#[derive(Debug, Clone)]
struct UrlParts {
    scheme: String,
    service: String,
    /// Segments before the interface (upstream keeps only the last one).
    dirs: Vec<String>,
    interface: Option<String>,
    labels: Vec<(String, String)>,
    enc: Encoding,
}

impl UrlParts {
    fn url(&self) -> String {
        let mut u = format!("{}://{}", self.scheme, self.service);
        for d in &self.dirs {
            u.push('/');
            u.push_str(d);
        }
        match &self.interface {
            Some(i) => {
                u.push('/');
                u.push_str(&percent_encode(i, self.enc));
            }
            None if !self.dirs.is_empty() => u.push('/'),
            None => {}
        }
        for (n, (k, v)) in self.labels.iter().enumerate() {
            u.push(if n == 0 { '?' } else { '&' });
            u.push_str(&percent_encode(k, self.enc));
            u.push('=');
            u.push_str(&percent_encode(v, self.enc));
        }
        u
    }

    /// Labels as the parser reports them: repeated keys joined with ",".
    fn expected_labels(&self) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &self.labels {
            m.entry(k.clone())
                .and_modify(|old| {
                    old.push(',');
                    old.push_str(v);
                })
                .or_insert_with(|| v.clone());
        }
        m
    }
}

fn url_parts() -> impl Strategy<Value = UrlParts> {
    let key = prop_oneof![3 => "[a-z]{1,3}", 1 => label_text()];
    (
        "[a-zA-Z0-9]{1,8}",
        service_name(),
        prop::collection::vec("[a-z0-9%.@-]{0,5}", 0..3),
        prop::option::of(interface_name()),
        prop::collection::vec((key, label_text()), 0..6),
        encoding(),
    )
        .prop_map(|(scheme, service, dirs, interface, labels, enc)| UrlParts {
            scheme,
            service,
            dirs,
            interface,
            labels,
            enc,
        })
}

/// Components `Display` can write as they are: no URL syntax (`/?&=%+,`), no spaces.
fn plain_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._~@:-]{0,10}"
}

/// A URL value whose parts need no escaping.
fn plain_nsurl() -> impl Strategy<Value = NsUrl> {
    (
        "[A-Z0-9]{1,8}",
        "[a-z0-9-]{1,12}(@[a-z0-9.]{1,12})?",
        prop::option::of(
            "[a-zA-Z0-9._@-]{1,15}"
                .prop_filter("not . or ..", |n| validate_interface_name(n).is_ok()),
        ),
        prop::collection::btree_map(plain_text(), plain_text(), 0..5),
    )
        .prop_map(|(mechanism, network_service, interface, labels)| NsUrl {
            mechanism,
            network_service,
            interface,
            labels,
        })
}

proptest! {
    #![proptest_config(config(512))]

    /// Any text is either refused or parsed into a URL whose parts keep the
    /// parser's promises (upper-case alphanumeric mechanism, a usable
    /// service, a valid interface name, labels free of control characters);
    /// nothing panics, also in list form.
    #[test]
    fn nsurl_any_text_parses_or_is_refused(s in prop_oneof![url_ish(), any::<String>()]) {
        if let Ok(u) = s.parse::<NsUrl>() {
            prop_assert!(!u.mechanism.is_empty());
            prop_assert!(u.mechanism.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()));
            prop_assert!(!u.network_service.is_empty());
            prop_assert!(!u.network_service.contains(['/', '?']));
            prop_assert!(!u.network_service.chars().any(|c| c.is_whitespace() || c.is_control()));
            if let Some(i) = &u.interface {
                prop_assert!(validate_interface_name(i).is_ok(), "interface {:?}", i);
            }
            for (k, v) in &u.labels {
                prop_assert!(!k.chars().chain(v.chars()).any(char::is_control));
            }
            let m = u.mechanism();
            prop_assert_eq!(m.parameters.get("name"), u.interface.as_ref());
        }
        if let Ok(list) = NsUrl::parse_list(&s) {
            prop_assert!(list.len() <= s.split(',').count());
        }
    }

    /// A URL written from valid parts, escaped in any of the ways URLs are
    /// (`%xx`, `%XX`, `+` for a space, escaping more than needed), parses
    /// back to exactly those parts.
    #[test]
    fn nsurl_from_valid_parts_parses_back(p in url_parts()) {
        let url = p.url();
        let u: NsUrl = url.parse().map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
        prop_assert_eq!(&u.mechanism, &p.scheme.to_ascii_uppercase());
        prop_assert_eq!(&u.network_service, &p.service);
        prop_assert_eq!(&u.interface, &p.interface);
        prop_assert_eq!(&u.labels, &p.expected_labels());
    }

    /// A bad percent escape anywhere the parser decodes (the interface, a
    /// label key or value) refuses the whole URL instead of guessing.
    #[test]
    fn nsurl_bad_escapes_are_refused(
        p in url_parts(),
        bad in prop_oneof![
            Just("%".to_owned()),
            "%[0-9a-fA-F]",
            "%[g-zG-Z +-][0-9a-fA-F]",
            "%[0-9a-fA-F][g-zG-Z]",
        ],
        where_ in 0..3usize,
    ) {
        let mut p = p;
        match where_ {
            0 => p.interface = Some("nsm".into()),
            _ if p.labels.is_empty() => p.labels.push(("k".into(), "v".into())),
            _ => {}
        }
        let mut url = p.url();
        // Appended raw: the escape ends the interface or the last label key/value.
        match where_ {
            0 => {
                url = match url.split_once('?') {
                    Some((head, query)) => format!("{head}{bad}?{query}"),
                    None => format!("{url}{bad}"),
                };
            }
            1 => {
                let eq = url.rfind('=').expect("a label");
                url.insert_str(eq, &bad);
            }
            _ => url.push_str(&bad),
        }
        prop_assert!(url.parse::<NsUrl>().is_err(), "{} accepted", url);
    }

    /// `Display` writes a URL whose parts need no escaping so that it parses
    /// back equal, alone and in an `NSM_NETWORK_SERVICES` list.
    #[test]
    fn nsurl_display_round_trips_plain_parts(urls in prop::collection::vec(plain_nsurl(), 1..4)) {
        for u in &urls {
            prop_assert_eq!(&u.to_string().parse::<NsUrl>(), &Ok(u.clone()));
        }
        let list: Vec<String> = urls.iter().map(ToString::to_string).collect();
        prop_assert_eq!(NsUrl::parse_list(&list.join(", ")), Ok(urls));
    }

    /// `Display` of any URL the parser accepted parses back to the same URL
    /// (it percent-encodes the interface and labels: this found `a://0?%25=`
    /// printed as `a://0?%=`, and `kernel://s?a=%2B` as `kernel://s?a=+`).
    #[test]
    fn nsurl_display_round_trips_every_parsed_url(p in url_parts()) {
        let u: NsUrl = p.url().parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let shown = u.to_string();
        prop_assert_eq!(shown.parse::<NsUrl>(), Ok(u), "shown as {}", shown);
    }
}

// ---------------------------------------------------------------- inode

/// The decimal digits of a number as written, without leading zeros.
fn canonical_digits(s: &str) -> &str {
    let t = s.trim_start_matches('0');
    if t.is_empty() { "0" } else { t }
}

fn inode_ish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("inode://".to_owned()),
        Just("/".to_owned()),
        Just("+".to_owned()),
        Just("-".to_owned()),
        Just(" ".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        "[0-9]{1,21}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

/// A way to spoil a valid `inode://dev/ino`.
#[derive(Debug, Clone)]
enum Spoil {
    ExtraSegment(String),
    Sign { ino: bool, sign: char },
    Overflow { ino: bool, by: u128 },
    Whitespace { at: usize, ws: char },
    Empty { ino: bool },
    Scheme(&'static str),
}

fn spoil() -> impl Strategy<Value = Spoil> {
    prop_oneof![
        "[0-9a-z]{0,4}".prop_map(Spoil::ExtraSegment),
        (any::<bool>(), prop::sample::select(vec!['+', '-']))
            .prop_map(|(ino, sign)| Spoil::Sign { ino, sign }),
        (any::<bool>(), 1..=u128::from(u64::MAX)).prop_map(|(ino, by)| Spoil::Overflow { ino, by }),
        (
            any::<usize>(),
            prop::sample::select(vec![' ', '\t', '\n', '\u{a0}', '\u{2003}'])
        )
            .prop_map(|(at, ws)| Spoil::Whitespace { at, ws }),
        any::<bool>().prop_map(|ino| Spoil::Empty { ino }),
        prop::sample::select(vec![
            "INODE://", "inode:/", "inode:", "file://", "inode//", ""
        ])
        .prop_map(Spoil::Scheme),
    ]
}

fn spoiled(dev: u64, ino: u64, s: &Spoil) -> String {
    let (d, i) = (dev.to_string(), ino.to_string());
    match s {
        Spoil::ExtraSegment(x) => format!("inode://{d}/{i}/{x}"),
        Spoil::Sign { ino: false, sign } => format!("inode://{sign}{d}/{i}"),
        Spoil::Sign { ino: true, sign } => format!("inode://{d}/{sign}{i}"),
        Spoil::Overflow { ino: false, by } => format!("inode://{}/{i}", u128::from(u64::MAX) + by),
        Spoil::Overflow { ino: true, by } => format!("inode://{d}/{}", u128::from(u64::MAX) + by),
        Spoil::Whitespace { at, ws } => {
            let mut u = format!("inode://{d}/{i}");
            // Anywhere on a character boundary, from before the scheme to the end.
            let at = at % (u.len() + 1);
            u.insert(at, *ws);
            u
        }
        Spoil::Empty { ino: false } => format!("inode:///{i}"),
        Spoil::Empty { ino: true } => format!("inode://{d}/"),
        Spoil::Scheme(scheme) => format!("{scheme}{d}/{i}"),
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Any text is refused or is exactly `inode://<digits>/<digits>` naming
    /// the parsed numbers (leading zeros allowed, as Go's ParseUint does);
    /// nothing panics.
    #[test]
    fn inode_any_text_parses_or_is_refused(s in prop_oneof![inode_ish(), any::<String>()]) {
        if let Ok(u) = s.parse::<InodeUrl>() {
            let rest = s.strip_prefix("inode://").expect("accepted without the scheme");
            let (d, i) = rest.split_once('/').expect("accepted without '/'");
            prop_assert!(!d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()), "{}", s);
            prop_assert!(!i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()), "{}", s);
            prop_assert_eq!(canonical_digits(d), u.dev.to_string());
            prop_assert_eq!(canonical_digits(i), u.ino.to_string());
        }
    }

    /// Every (dev, ino) pair is written as `inode://dev/ino` and reads back.
    #[test]
    fn inode_every_pair_round_trips(dev in any::<u64>(), ino in any::<u64>()) {
        let u = InodeUrl::new(dev, ino);
        let s = u.to_string();
        prop_assert_eq!(&s, &format!("inode://{dev}/{ino}"));
        prop_assert_eq!(s.parse::<InodeUrl>(), Ok(u));
    }

    /// A valid URL with an extra segment, a sign, a number past u64, inserted
    /// whitespace, an empty number or another scheme is refused.
    #[test]
    fn inode_malformed_forms_are_refused(dev in any::<u64>(), ino in any::<u64>(), how in spoil()) {
        let s = spoiled(dev, ino, &how);
        prop_assert!(s.parse::<InodeUrl>().is_err(), "{:?} accepted", s);
    }
}

// ---------------------------------------------------------------- grpcfd

/// The grpcfd tests count this process's fds: they run one at a time.
static FD_TESTS: Mutex<()> = Mutex::new(());

/// Room for fds in one read of `FdStream` (conn.rs `MAX_FDS_PER_READ`, not
/// public): the kernel closes the rest of a larger batch.
const READ_ROOM: usize = 64;

/// This process's fd count before a case. The first tokio runtime opens
/// tokio's process-wide signal socketpair, kept for good: made here once, so
/// it is not mistaken for a leak of the first case.
fn baseline_fd_count() -> usize {
    static WARM_UP: std::sync::Once = std::sync::Once::new();
    WARM_UP.call_once(|| drop(runtime()));
    fd_count()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// The fd count once transient fds of other threads are gone (bounded wait):
/// a leak stays, so it still shows.
fn settled_fd_count(target: usize) -> usize {
    let mut n = fd_count();
    for _ in 0..50 {
        if n <= target {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        n = fd_count();
    }
    n
}

/// Distinct open files (pipe read ends; write ends closed at once).
fn pipes(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| nix::unistd::pipe().expect("pipe").0)
        .collect()
}

fn urls_of(fds: &[OwnedFd]) -> Vec<InodeUrl> {
    fds.iter()
        .map(|f| inode_url_of(f.as_fd()).expect("fstat"))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Reads `rx` to its end, `sizes` (cycled) bytes at most per read.
async fn read_all(rx: &mut FdStream, sizes: &[usize]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; sizes.iter().copied().max().unwrap_or(1)];
    for size in sizes.iter().cycle() {
        let n = tokio::time::timeout(Duration::from_secs(10), rx.read(&mut buf[..*size]))
            .await
            .expect("read stalled")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// One `sendmsg` a raw peer makes: its bytes and how many fds ride on it.
#[derive(Debug, Clone)]
struct Message {
    bytes: Vec<u8>,
    fds: usize,
}

fn message() -> impl Strategy<Value = Message> {
    let fds = prop_oneof![
        4 => Just(0usize),
        3 => 1..=4usize,
        1 => 60..=70usize,
        1 => 90..=130usize,
    ];
    (prop::collection::vec(any::<u8>(), 1..600), fds)
        .prop_map(|(bytes, fds)| Message { bytes, fds })
}

/// Sends every message, blocking, each with its fds; then closes the socket.
fn raw_peer(sock: StdUnixStream, messages: &[Message], fds: &[OwnedFd]) {
    let mut next = 0;
    for m in messages {
        let rights: Vec<RawFd> = fds[next..next + m.fds]
            .iter()
            .map(AsRawFd::as_raw_fd)
            .collect();
        next += m.fds;
        let cmsg = [ControlMessage::ScmRights(&rights)];
        let cmsgs: &[ControlMessage<'_>] = if rights.is_empty() { &[] } else { &cmsg };
        let mut sent = sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[IoSlice::new(&m.bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .expect("sendmsg with fds");
        // A blocking stream socket takes everything, but do not rely on it.
        while sent < m.bytes.len() {
            sent += sendmsg::<UnixAddr>(
                sock.as_raw_fd(),
                &[IoSlice::new(&m.bytes[sent..])],
                &[],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .expect("sendmsg");
        }
    }
}

/// How the receiving channel is made.
fn bound() -> impl Strategy<Value = Option<usize>> {
    // `None`: `FdStream::new`, the default bound.
    prop_oneof![1 => Just(None), 3 => (0..=80usize).prop_map(Some)]
}

fn stream_with(io: tokio::net::UnixStream, bound: Option<usize>) -> FdStream {
    match bound {
        None => FdStream::new(io),
        Some(max) => FdStream::with_channel(io, FdChannel::with_max_held(max)),
    }
}

/// What the reading side saw, gathered before anything is dropped.
struct Seen {
    bytes: Vec<u8>,
    stats: nsm_api::grpcfd::FdStats,
    max_held: usize,
    /// For each sent fd in order: whether the channel holds it (and hands out the same file).
    held: Vec<bool>,
}

fn seen(rx: &FdStream, bytes: Vec<u8>, urls: &[InodeUrl]) -> Seen {
    let ch = rx.channel();
    let held = urls
        .iter()
        .map(|url| match ch.try_recv_fd(url).expect("try_recv_fd") {
            Some(fd) => {
                assert_eq!(
                    inode_url_of(fd.as_fd()).expect("fstat"),
                    *url,
                    "another file"
                );
                true
            }
            None => false,
        })
        .collect();
    Seen {
        bytes,
        stats: ch.stats(),
        max_held: ch.max_held(),
        held,
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// A raw peer sends arbitrary bytes in arbitrary `sendmsg` chunks, with
    /// up to 130 fds per chunk (beyond the 64 a read takes and beyond the
    /// held bound), optionally with SO_PASSCRED so every read also carries
    /// credentials (a second control message before SCM_RIGHTS, which
    /// leaves less room for fds). The reader returns every byte in order,
    /// adopts exactly the fds the kernel installed, holds at most its bound
    /// of them (the first ones that arrived), and once everything is
    /// dropped no fd is left behind.
    #[test]
    fn grpcfd_reader_takes_any_chunks_and_fds_from_a_raw_peer(
        messages in prop::collection::vec(message(), 1..7),
        reads in prop::collection::vec(1..=700usize, 1..6),
        bound in bound(),
        passcred in any::<bool>(),
    ) {
        let _serial = FD_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let before = baseline_fd_count();
        {
            let total: usize = messages.iter().map(|m| m.fds).sum();
            let fds = pipes(total);
            let urls = urls_of(&fds);
            let (tx, rx) = StdUnixStream::pair().expect("socketpair");
            if passcred {
                setsockopt(&rx, sockopt::PassCred, &true).expect("SO_PASSCRED");
            }
            rx.set_nonblocking(true).expect("nonblocking");
            let seen = std::thread::scope(|s| {
                let peer = s.spawn(|| raw_peer(tx, &messages, &fds));
                let rt = runtime();
                let seen = rt.block_on(async {
                    let rx = tokio::net::UnixStream::from_std(rx).expect("tokio");
                    let mut rx = stream_with(rx, bound);
                    let bytes = read_all(&mut rx, &reads).await;
                    seen(&rx, bytes, &urls)
                });
                peer.join().expect("peer");
                seen
            });
            let want: Vec<u8> = messages.iter().flat_map(|m| m.bytes.iter().copied()).collect();
            prop_assert!(
                seen.bytes == want,
                "bytes differ: got {} want {}",
                seen.bytes.len(),
                want.len()
            );
            prop_assert_eq!(seen.max_held, bound.unwrap_or(DEFAULT_MAX_HELD_FDS));
            // Which fds the kernel installed: the first ones of each batch, as many as fit.
            let mut arrived_in_room = vec![false; total];
            let mut first = 0;
            for m in &messages {
                for slot in arrived_in_room.iter_mut().skip(first).take(m.fds.min(READ_ROOM)) {
                    *slot = true;
                }
                first += m.fds;
            }
            let s = seen.stats;
            let fit = arrived_in_room.iter().filter(|a| **a).count() as u64;
            if passcred {
                prop_assert!(s.arrived <= fit, "arrived {} > {}", s.arrived, fit);
            } else {
                prop_assert_eq!(s.arrived, fit);
            }
            prop_assert_eq!(s.duplicates, 0);
            prop_assert!(s.held <= seen.max_held, "held {} > bound {}", s.held, seen.max_held);
            prop_assert_eq!(s.held as u64, s.arrived.min(seen.max_held as u64));
            prop_assert_eq!(s.rejected, s.arrived - s.held as u64);
            prop_assert_eq!(seen.held.iter().filter(|h| **h).count(), s.held);
            // Held: only fds that arrived; without credentials, exactly the first `held` of them.
            for (i, h) in seen.held.iter().enumerate() {
                prop_assert!(!h || arrived_in_room[i], "fd {} held but never sent in room", i);
            }
            if !passcred {
                let expected: Vec<bool> = arrived_in_room
                    .iter()
                    .scan(0usize, |n, a| {
                        let keep = *a && *n < s.held;
                        *n += usize::from(*a);
                        Some(keep)
                    })
                    .collect();
                prop_assert_eq!(&seen.held, &expected);
            }
        }
        let after = settled_fd_count(before);
        prop_assert!(after <= before, "fds leaked: {} before, {} after", before, after);
    }

    /// `FdStream` to `FdStream` with arbitrary write splits and fds queued
    /// between writes (more than one write carries): the bytes arrive in
    /// order; each write sends at least min(queued, 64, its length) and at
    /// most min(queued, its length) fds (one byte each, queue order); the
    /// reader gets every sent fd once and holds at most its bound; unsent
    /// fds close with the stream, so no fd is left behind.
    #[test]
    fn grpcfd_stream_to_stream_any_splits_and_fds(
        steps in prop::collection::vec(
            (
                prop_oneof![3 => 0..=3usize, 1 => 60..=80usize],
                prop::collection::vec(any::<u8>(), 0..400),
            ),
            1..8,
        ),
        reads in prop::collection::vec(1..=700usize, 1..6),
        bound in bound(),
    ) {
        let _serial = FD_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let before = baseline_fd_count();
        {
            let total: usize = steps.iter().map(|(k, _)| k).sum();
            let fds = pipes(total);
            let urls = urls_of(&fds);
            let rt = runtime();
            let (per_write, tx_stats, seen) = rt.block_on(async {
                let (a, b) = tokio::net::UnixStream::pair().expect("socketpair");
                let mut tx = FdStream::new(a);
                let mut rx = stream_with(b, bound);
                let writer = async {
                    let mut next = 0;
                    // (queued before the write, its length, fds it sent)
                    let mut per_write = Vec::new();
                    for (k, chunk) in &steps {
                        for fd in &fds[next..next + k] {
                            let url = tx.channel().send_fd(fd.as_fd()).expect("send_fd");
                            prop_assert_eq!(url, urls[next]);
                            next += 1;
                        }
                        let before = tx.channel().stats();
                        tx.write_all(chunk).await.expect("write_all");
                        let after = tx.channel().stats();
                        let sent = (after.sent - before.sent) as usize;
                        per_write.push((before.queued, chunk.len(), sent));
                    }
                    let stats = tx.channel().stats();
                    tx.shutdown().await.expect("shutdown");
                    let ch = tx.channel().clone();
                    drop(tx);
                    prop_assert!(ch.is_closed());
                    prop_assert_eq!(ch.stats().queued, 0, "unsent fds kept after the stream ended");
                    Ok((per_write, stats))
                };
                let reader = async {
                    let bytes = read_all(&mut rx, &reads).await;
                    seen(&rx, bytes, &urls)
                };
                let (w, seen) = tokio::join!(writer, reader);
                w.map(|(per_write, stats)| (per_write, stats, seen))
            })?;
            let want: Vec<u8> = steps.iter().flat_map(|(_, c)| c.iter().copied()).collect();
            prop_assert!(
                seen.bytes == want,
                "bytes differ: got {} want {}",
                seen.bytes.len(),
                want.len()
            );
            for &(queued, len, sent) in &per_write {
                let (most, least) = (queued.min(len), queued.min(len).min(MAX_FDS_PER_WRITE));
                prop_assert!(
                    (least..=most).contains(&sent),
                    "{} fds on a {}-byte write with {} queued",
                    sent,
                    len,
                    queued
                );
            }
            let sent = tx_stats.sent;
            prop_assert_eq!(sent as usize + tx_stats.queued, total);
            let s = seen.stats;
            prop_assert_eq!((s.arrived, s.duplicates), (sent, 0));
            prop_assert!(s.held <= seen.max_held);
            prop_assert_eq!(s.held as u64, sent.min(seen.max_held as u64));
            // The held fds are the first ones queued.
            let expected: Vec<bool> = (0..total).map(|i| i < s.held).collect();
            prop_assert_eq!(&seen.held, &expected);
        }
        let after = settled_fd_count(before);
        prop_assert!(after <= before, "fds leaked: {} before, {} after", before, after);
    }
}
