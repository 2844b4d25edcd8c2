//! Proxies that outlive us: a proxy started with a [`Keep`] writes its
//! output to a log file (not to pipes that would break when we die) and
//! gets no parent-death signal, and its pid, start time and the digest of
//! what it runs are recorded in a pidfile. A restarted endpoint or node
//! agent adopts it from there — the same process, watched through a pidfd
//! — instead of starting a duplicate or interrupting its traffic.
//!
//! The pidfile is written twice: by the child itself between fork and exec
//! (its pid only), so a crash of ours right after the fork never leaves a
//! proxy nobody knows, and by us once it runs (start time, digest).

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ProcessSpec;
use crate::netns::Netns;

/// The pidfile format this build reads and writes.
const PIDFILE_VERSION: u32 = 1;
/// A log file beyond this is emptied (the proxy appends, so it goes on at
/// the start): a chatty proxy never fills the disk.
pub const MAX_LOG: u64 = 4 << 20;
/// How much of the log's end is read for its last lines.
const TAIL: u64 = 16 << 10;

/// Where a proxy that outlives us keeps its record and its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keep {
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

impl Keep {
    /// `<dir>/<name>.pid` and `<dir>/<name>.log`.
    pub fn in_dir(dir: &Path, name: &str) -> Keep {
        Keep {
            pidfile: dir.join(format!("{name}.pid")),
            log: dir.join(format!("{name}.log")),
        }
    }
}

/// What a pidfile says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PidRecord {
    version: u32,
    pid: u32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22):
    /// with the boot id, what tells our process from a later one that got
    /// its pid. Absent in what the child wrote.
    #[serde(default)]
    start_ticks: Option<u64>,
    #[serde(default)]
    boot_id: Option<String>,
    /// Digest of the spec it runs.
    #[serde(default)]
    digest: Option<String>,
}

/// A process found running from an earlier run of ours.
#[derive(Debug)]
pub struct Adopted {
    pub pid: u32,
    /// Becomes readable when the process exits.
    pub pidfd: OwnedFd,
    /// It runs another spec than the one we would start now (its
    /// definition changed while we were away): to be upgraded.
    pub stale: bool,
}

/// A stable digest of what runs: program, arguments, environment, identity.
pub fn digest(spec: &ProcessSpec) -> String {
    let mut text = String::new();
    for a in &spec.argv {
        text.push_str(a);
        text.push('\0');
    }
    for (k, v) in &spec.env {
        text.push_str(&format!("{k}={v}\0"));
    }
    text.push_str(&format!("{:?}/{:?}/{:?}", spec.uid, spec.gid, spec.ready));
    // Changed limits are a changed definition (none: digests as before).
    if spec.limits != super::Limits::default() {
        text.push_str(&format!("/{:?}", spec.limits));
    }
    format!("{:016x}", crate::hop::fnv1a64(text.as_bytes()))
}

use crate::hop::state::boot_id;

/// `/proc/<pid>/stat`'s state letter and start time.
pub(crate) fn stat(pid: u32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 overall; `rest` starts at field 3.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether `pid` runs the program `argv` names (what the child's own
/// record, without a start time, is checked against).
fn runs(pid: u32, argv: &[String]) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let want = argv.first().map(String::as_str).unwrap_or_default();
    let name = |p: &[u8]| p.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
    !first.is_empty() && name(first) == name(want.as_bytes())
}

fn in_netns(pid: u32, netns: Option<&Netns>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(ns) = netns else {
        return true;
    };
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .is_ok_and(|m| m.dev() == ns.id().dev && m.ino() == ns.id().ino)
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor pidfd_open just returned, owned by nobody else.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `pidfd` has exited.
pub async fn exited(pidfd: OwnedFd) {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the AsyncFd owns the descriptor, so the fd it registers
    // stays open and the same for its whole life.
    #[allow(unsafe_code)]
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(e) => {
            let (fd, why) = e.into_parts();
            tracing::debug!(error = %why, "pidfd not pollable by the runtime; polling");
            loop {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                #[allow(unsafe_code)]
                if unsafe { libc::poll(&mut p, 1, 0) } != 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

fn read(pidfile: &Path) -> Option<PidRecord> {
    let mut text = String::new();
    std::fs::File::open(pidfile)
        .ok()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text)
        .ok()
        .filter(|r: &PidRecord| r.version == PIDFILE_VERSION)
}

/// Whether the record's process still runs and is the one recorded (same
/// start time, same boot): not a later process that got its pid.
fn still_recorded(rec: &PidRecord) -> bool {
    let same_boot = rec.boot_id.is_none() || rec.boot_id == boot_id();
    matches!(
        (stat(rec.pid), rec.start_ticks),
        (Some((state, now)), Some(then)) if state != 'Z' && now == then && same_boot
    )
}

/// Records `pid` running `spec` in `pidfile` (a temp file, then rename).
pub fn record(pidfile: &Path, pid: u32, spec: &ProcessSpec) -> std::io::Result<()> {
    let rec = PidRecord {
        version: PIDFILE_VERSION,
        pid,
        start_ticks: stat(pid).map(|(_, t)| t),
        boot_id: boot_id(),
        digest: Some(digest(spec)),
    };
    let tmp = pidfile.with_extension("pid.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&rec).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, pidfile)
}

/// Forgets the proxy of `pidfile` (it is stopped).
pub fn forget(pidfile: &Path) {
    let _ = std::fs::remove_file(pidfile);
}

/// Forgets `pid`'s record (`None`: ours was not running), unless
/// `pidfile` names another process by now (a newer proxy on the same ports
/// started while this one drained).
pub fn forget_pid(pidfile: &Path, pid: Option<u32>) {
    match (read(pidfile), pid) {
        (Some(rec), Some(pid)) if rec.pid != pid => {}
        (Some(rec), None) if still_recorded(&rec) => {}
        _ => forget(pidfile),
    }
}

/// The live process `pidfile` names, if it is the one recorded and lives in
/// `netns`. A process only the child's own record names (we crashed before
/// recording it) is stopped: what it runs is unknown. Anything else the
/// file says is stale and the file is removed.
pub fn adopt(pidfile: &Path, spec: &ProcessSpec, netns: Option<&Netns>) -> Option<Adopted> {
    let rec = read(pidfile)?;
    let ours = if rec.start_ticks.is_some() {
        still_recorded(&rec)
    } else {
        stat(rec.pid).is_some_and(|(state, _)| state != 'Z') && runs(rec.pid, &spec.argv)
    };
    if !ours || !in_netns(rec.pid, netns) {
        forget(pidfile);
        return None;
    }
    if rec.start_ticks.is_none() {
        tracing::warn!(
            pid = rec.pid,
            "a proxy started just before a crash was never recorded: stopping it"
        );
        super::terminate(
            rec.pid,
            nix::sys::signal::Signal::SIGKILL,
            Default::default(),
        );
        forget(pidfile);
        return None;
    }
    let pidfd = pidfd_open(rec.pid).ok()?;
    // The pid could have been recycled between the check and the open.
    if stat(rec.pid).map(|(_, t)| t) != rec.start_ticks {
        forget(pidfile);
        return None;
    }
    Some(Adopted {
        pid: rec.pid,
        pidfd,
        stale: rec.digest.as_deref() != Some(&digest(spec)),
    })
}

/// Stops the proxy `pidfile` names, if it is still the one recorded (its
/// owner is gone: a connection closed while we were down), with `signal`
/// and `drain`; removes the file.
pub fn reap(pidfile: &Path, signal: nix::sys::signal::Signal, drain: std::time::Duration) {
    if let Some(rec) = read(pidfile)
        && still_recorded(&rec)
    {
        tracing::info!(pid = rec.pid, pidfile = %pidfile.display(), "stopping a proxy whose connection is gone");
        super::terminate(rec.pid, signal, drain);
    }
    forget(pidfile);
}

/// The log file, opened for the proxy's stdout and stderr (emptied first
/// when it grew beyond [`MAX_LOG`]).
pub fn open_log(log: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(log)?;
    trim(&f);
    Ok(f)
}

/// Empties the log when it grew beyond [`MAX_LOG`].
pub fn trim(f: &std::fs::File) {
    if f.metadata().is_ok_and(|m| m.len() > MAX_LOG) {
        let _ = f.set_len(0);
    }
}

/// The last `n` lines of the log, each cut to `max` bytes.
pub fn last_lines(log: &Path, from: u64, n: usize, max: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // From `from` (where this run began) unless the log was trimmed since.
    let start = if from <= len { from } else { 0 };
    let _ = f.seek(SeekFrom::Start(start.max(len.saturating_sub(TAIL))));
    let mut buf = Vec::new();
    let _ = f.take(TAIL).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut l = l.to_owned();
            if l.len() > max {
                let mut cut = max;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
            }
            l
        })
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    lines
}

/// What the child needs to write its own pidfile between fork and exec,
/// prepared before the fork (the child may not allocate).
pub struct ChildRecord {
    path: CString,
}

impl ChildRecord {
    pub fn new(pidfile: &Path) -> std::io::Result<ChildRecord> {
        Ok(ChildRecord {
            path: CString::new(pidfile.as_os_str().as_bytes())?,
        })
    }

    /// In the child: writes `{"version":1,"pid":N}`. Only async-signal-safe
    /// calls, no allocation.
    pub fn write(&self) -> std::io::Result<()> {
        // SAFETY: getpid(2) cannot fail.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::getpid() } as u32;
        let mut buf = [0u8; 48];
        let head = br#"{"version":1,"pid":"#;
        buf[..head.len()].copy_from_slice(head);
        let mut at = head.len();
        let mut digits = [0u8; 10];
        let (mut n, mut d) = (pid, 0);
        loop {
            digits[d] = b'0' + (n % 10) as u8;
            d += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        while d > 0 {
            d -= 1;
            buf[at] = digits[d];
            at += 1;
        }
        buf[at] = b'}';
        at += 1;
        // SAFETY: open(2)/write(2)/close(2) on a NUL-terminated path we own
        // and a buffer of `at` initialised bytes.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::open(
                self.path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let w = libc::write(fd, buf.as_ptr().cast(), at);
            libc::close(fd);
            if w != at as isize {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str]) -> ProcessSpec {
        ProcessSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            uid: None,
            gid: None,
            ready: super::super::Readiness::Tcp(1),
            start_timeout: Default::default(),
            drain_timeout: Default::default(),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            limits: Default::default(),
        }
    }

    #[test]
    fn a_drained_proxy_forgets_only_its_own_record() {
        let dir = std::env::temp_dir().join(format!("kept-forget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = Keep::in_dir(&dir, "p");
        record(&k.pidfile, 4_194_400, &spec(&["x"])).unwrap();
        forget_pid(&k.pidfile, Some(4_194_401));
        assert!(k.pidfile.exists(), "a newer proxy's record stays");
        forget_pid(&k.pidfile, Some(4_194_400));
        assert!(!k.pidfile.exists());
        record(&k.pidfile, 4_194_400, &spec(&["x"])).unwrap();
        forget_pid(&k.pidfile, None);
        assert!(
            !k.pidfile.exists(),
            "ours was not running, nor is the recorded one"
        );
        record(&k.pidfile, std::process::id(), &spec(&["x"])).unwrap();
        forget_pid(&k.pidfile, None);
        assert!(k.pidfile.exists(), "a live process's record stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_recorded_live_process_is_adopted_and_a_changed_spec_is_stale() {
        let dir = std::env::temp_dir().join(format!("kept-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = Keep::in_dir(&dir, "p");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let s = spec(&["sleep", "30"]);
        record(&k.pidfile, child.id(), &s).unwrap();
        let a = adopt(&k.pidfile, &s, None).expect("adopted");
        assert_eq!(a.pid, child.id());
        assert!(!a.stale);
        let a = adopt(&k.pidfile, &spec(&["sleep", "31"]), None).expect("adopted");
        assert!(a.stale, "another spec");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(adopt(&k.pidfile, &s, None).is_none(), "gone");
        assert!(!k.pidfile.exists(), "a stale pidfile is removed");
        // What only the child wrote: stopped, not adopted.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Once it runs sleep (not our fork before its exec).
        while !runs(child.id(), &s.argv) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::fs::write(
            &k.pidfile,
            format!("{{\"version\":1,\"pid\":{}}}", child.id()),
        )
        .unwrap();
        assert!(adopt(&k.pidfile, &s, None).is_none());
        assert!(child.wait().unwrap().code().is_none(), "killed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_childs_own_record_parses() {
        let dir = std::env::temp_dir().join(format!("kept-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.pid");
        ChildRecord::new(&p).unwrap().write().unwrap();
        let r = read(&p).unwrap();
        assert_eq!(r.pid, std::process::id());
        assert_eq!(r.start_ticks, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_log_keeps_its_last_lines() {
        let dir = std::env::temp_dir().join(format!("kept-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, format!("{text}{}\n", "y".repeat(500))).unwrap();
        let l = last_lines(&log, 0, 3, 300);
        assert_eq!(l[..2], ["line 98", "line 99"]);
        assert_eq!(l[2].len(), 300);
        // Only what came after `from`: this run's lines, not the last one's.
        let from = text.len() as u64;
        assert_eq!(last_lines(&log, from, 3, 10), ["yyyyyyyyyy"]);
        let f = open_log(&log).unwrap();
        f.set_len(MAX_LOG + 1).unwrap();
        trim(&f);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
