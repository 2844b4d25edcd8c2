//! A proxy process whose whole life we own: started in the caller's network
//! namespace (a child inherits it) as the configured user, ready when its
//! port answers, restarted with backoff when it dies (its redirect rules
//! stay: traffic waits for it, never bypasses it), stopped with a drain
//! period. Without a [`Keep`] it is killed with us (parent-death signal);
//! with one it outlives us, as the rules that send traffic to it do, and
//! our next run adopts it ([`kept`]).

use std::collections::{BTreeMap, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::netns::Netns;

pub mod config;
pub mod kept;
pub mod limits;

pub use config::{ProcessConfig, ProxyDefinitions};
pub use kept::Keep;
pub use limits::{Limits, LimitsConfig};

/// How far an upgraded proxy's ports are from those it was defined with:
/// the new proxy listens there while the old one still serves its
/// connections (the next upgrade moves back).
pub const UPGRADE_PORT_SHIFT: u16 = 100;

/// Lines of the proxy's output kept for the reason of a failure.
const KEPT_LINES: usize = 20;
/// Longest output line kept (longer ones are cut).
const MAX_LINE: usize = 300;
/// How often readiness is probed while starting.
const PROBE_EVERY: Duration = Duration::from_millis(50);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Ready this long: the next crash starts the backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a caller whose wait ran out waits more for the try under way.
const SETTLE: Duration = Duration::from_secs(2);
/// How often a kept proxy's log is checked for its size.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// When the proxy counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A TCP socket listens on the port (in the proxy's namespace). Not a
    /// connection: a transparent proxy would relay one made to its own
    /// port to its original destination — itself — and loop.
    Tcp(u16),
    /// `GET path` on 127.0.0.1:port answers 200 (e.g. Envoy's `/ready`).
    Http { port: u16, path: String },
}

/// What to run, rendered by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments (the program is looked up in `PATH`).
    pub argv: Vec<String>,
    /// The whole environment of the process.
    pub env: BTreeMap<String, String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub ready: Readiness,
    /// From spawn to ready, else it is killed and started again.
    pub start_timeout: Duration,
    /// From the stop signal to SIGKILL when stopping.
    pub drain_timeout: Duration,
    /// What asks it to stop: SIGTERM, or the proxy's graceful one (HAProxy
    /// finishes its connections on SIGUSR1, Envoy on SIGTERM).
    pub stop_signal: nix::sys::signal::Signal,
    pub limits: Limits,
}

impl ProcessSpec {
    /// Whether this spec, rendered for other ports, runs beside `other`
    /// (the same definition on the old ports) and can be told apart from
    /// it: its command or environment follows the ports, and so does its
    /// readiness check (else the old process would answer it). Only then
    /// can an upgrade start the new process before the old one goes.
    pub fn runs_beside(&self, other: &ProcessSpec) -> bool {
        (self.argv != other.argv || self.env != other.env) && self.ready != other.ready
    }
}

/// Where the proxy is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyState {
    Starting,
    Ready {
        pid: u32,
    },
    /// It failed (why, with its last output lines); it is started again
    /// after a backoff.
    Restarting {
        reason: String,
    },
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the proxy is not ready within {within:?}: {reason}")]
    NotReady { within: Duration, reason: String },
    #[error("the proxy failed to start: {reason}")]
    Failed { reason: String },
    #[error("the proxy is stopped")]
    Stopped,
}

/// What the supervisor reports: each start (`true`: a restart).
pub type OnStart = Box<dyn Fn(bool) + Send + Sync>;

/// One supervised proxy.
pub struct Supervisor {
    state: watch::Receiver<ProxyState>,
    pid: Arc<AtomicU32>,
    stopping: Arc<AtomicBool>,
    /// Why it last failed (kept while a next try is starting).
    last_failure: Arc<Mutex<Option<String>>>,
    drain: Duration,
    stop_signal: nix::sys::signal::Signal,
    start_timeout: Duration,
    /// It outlives us: dropping the supervisor leaves it running.
    keep: Option<Keep>,
    /// Its first run was a process adopted from an earlier run of ours
    /// (`Some(stale)`: whether it runs another spec than ours).
    adopted: Arc<Mutex<Option<bool>>>,
}

impl Supervisor {
    /// Starts `spec` now in our own namespace and keeps it running; call
    /// inside a Tokio runtime.
    pub fn start(spec: ProcessSpec, on_start: OnStart) -> Supervisor {
        Self::start_in(spec, None, on_start)
    }

    /// [`Supervisor::start`] in `netns` (e.g. a client pod's): the process
    /// lives on our node, its sockets in that namespace, where its
    /// readiness is probed too. The supervisor holds the namespace open.
    pub fn start_in(spec: ProcessSpec, netns: Option<Netns>, on_start: OnStart) -> Supervisor {
        Self::start_kept(spec, netns, None, on_start)
    }

    /// [`Supervisor::start_in`], and with `keep` the proxy outlives us: the
    /// one `keep.pidfile` names is adopted if it still runs (no second
    /// start), and our next run adopts this one.
    pub fn start_kept(
        spec: ProcessSpec,
        netns: Option<Netns>,
        keep: Option<Keep>,
        on_start: OnStart,
    ) -> Supervisor {
        let (tx, rx) = watch::channel(ProxyState::Starting);
        let pid = Arc::new(AtomicU32::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (drain, start_timeout, stop_signal) =
            (spec.drain_timeout, spec.start_timeout, spec.stop_signal);
        let netns = netns.map(Arc::new);
        let last_failure = Arc::new(Mutex::new(None));
        let adopted = Arc::new(Mutex::new(None));
        tokio::spawn(supervise(
            Run {
                spec,
                netns,
                keep: keep.clone(),
                tx,
                pid: pid.clone(),
                stopping: stopping.clone(),
                adopted: adopted.clone(),
                cgroup_name: cgroup_name(keep.as_ref()),
                made: Mutex::default(),
            },
            last_failure.clone(),
            on_start,
        ));
        Supervisor {
            state: rx,
            pid,
            stopping,
            last_failure,
            drain,
            stop_signal,
            start_timeout,
            keep,
            adopted,
        }
    }

    /// Once its first run is ready: `Some(stale)` if that was a process
    /// adopted from an earlier run of ours (`stale`: it runs another spec
    /// than ours, and wants an upgrade), `None` if we started it.
    pub fn adopted(&self) -> Option<bool> {
        *self.adopted.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> ProxyState {
        self.state.borrow().clone()
    }

    /// The running proxy's pid.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Relaxed) {
            0 => None,
            p => Some(p),
        }
    }

    /// Waits until the proxy is ready, at most `within`; the error says
    /// why it is not (its last failure and output).
    pub async fn ready(&self, within: Duration) -> Result<u32, ProxyError> {
        let mut rx = self.state.clone();
        let wait = rx.wait_for(|s| matches!(s, ProxyState::Ready { .. } | ProxyState::Stopped));
        // Owned, so no borrow of the state lives across the waits below.
        let outcome = match tokio::time::timeout(within, wait).await {
            Ok(Ok(s)) => Some(s.clone()),
            Ok(Err(_)) => Some(ProxyState::Stopped),
            Err(_) => None,
        };
        match outcome {
            Some(ProxyState::Ready { pid }) => return Ok(pid),
            Some(_) => return Err(ProxyError::Stopped),
            None => {}
        }
        // A try still under way (a slow exit, a loaded machine): its
        // outcome, shortly, says more than "Starting".
        let mut rx = self.state.clone();
        let settled = rx.wait_for(|s| !matches!(s, ProxyState::Starting));
        let _ = tokio::time::timeout(SETTLE, async { settled.await.map(|_| ()) }).await;
        let reason = match self.state() {
            ProxyState::Restarting { reason } => reason,
            ProxyState::Ready { pid } => return Ok(pid),
            other => self
                .last_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| format!("{other:?}")),
        };
        Err(ProxyError::NotReady { within, reason })
    }

    /// Waits for the first start only: ready, or the reason it failed as
    /// soon as it did (exited, or not ready within its start timeout) —
    /// for a caller that gives up instead of waiting for restarts.
    pub async fn first_ready(&self) -> Result<u32, ProxyError> {
        let mut rx = self.state.clone();
        let within = self.start_timeout;
        let wait = rx.wait_for(|s| !matches!(s, ProxyState::Starting));
        // The supervisor's own start timeout ends the first try; this bound
        // only guards against a supervisor that never reports.
        match tokio::time::timeout(within + Duration::from_secs(2), wait).await {
            Ok(Ok(s)) => match &*s {
                ProxyState::Ready { pid } => Ok(*pid),
                ProxyState::Restarting { reason } => Err(ProxyError::Failed {
                    reason: reason.clone(),
                }),
                _ => Err(ProxyError::Stopped),
            },
            Ok(Err(_)) => Err(ProxyError::Stopped),
            Err(_) => Err(ProxyError::NotReady {
                within,
                reason: "the supervisor did not report".into(),
            }),
        }
    }

    /// Stops the proxy for good: SIGTERM, up to the drain timeout for it to
    /// finish what it serves, then SIGKILL. Blocks until it is gone.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let pid = self.pid();
        if let Some(pid) = pid {
            tracing::info!(pid, signal = %self.stop_signal, drain = ?self.drain, "proxy draining");
            terminate(pid, self.stop_signal, self.drain);
            tracing::info!(pid, "proxy stopped");
        }
        if let Some(k) = &self.keep {
            kept::forget_pid(&k.pidfile, pid);
        }
    }
}

impl Drop for Supervisor {
    /// Stops the proxy, unless it is kept: then it runs on for our next
    /// run to adopt (its owner calls [`Supervisor::stop`] when it is done).
    fn drop(&mut self) {
        if self.keep.is_none() {
            self.stop();
        }
    }
}

/// `signal`, then SIGKILL after `drain`; returns once `pid` is gone (a
/// zombie counts as gone: its reaper is elsewhere).
pub(crate) fn terminate(pid: u32, signal: nix::sys::signal::Signal, drain: Duration) {
    use nix::sys::signal::{Signal, kill};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let gone = || kept::stat(pid).is_none_or(|(state, _)| state == 'Z');
    if kill(p, signal).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + drain;
    while std::time::Instant::now() < deadline {
        if gone() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(p, Signal::SIGKILL);
    for _ in 0..100 {
        if gone() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

type Output = Arc<Mutex<VecDeque<String>>>;

fn last_lines(out: &Output) -> String {
    summary(out.lock().unwrap_or_else(|p| p.into_inner()).iter())
}

/// A proxy's last lines, for the reason of a failure.
fn summary<S: AsRef<str>>(lines: impl Iterator<Item = S>) -> String {
    let text = lines
        .map(|l| l.as_ref().to_owned())
        .collect::<Vec<_>>()
        .join(" | ");
    if text.is_empty() {
        "no output".into()
    } else {
        format!("last output: {text}")
    }
}

fn keep_output(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    out: Output,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(mut line)) = lines.next_line().await {
            tracing::debug!(target: "proxy", "{line}");
            if line.len() > MAX_LINE {
                let mut cut = MAX_LINE;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            let mut kept = out.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    })
}

/// Where programs are looked for when neither we nor the spec have a PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `program` as a path: as given when it names one, else the first match
/// in the spec's PATH, ours, or the default one.
fn resolve(program: &str, env: &BTreeMap<String, String>) -> std::path::PathBuf {
    if program.contains('/') {
        return program.into();
    }
    let path = env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    std::env::split_paths(&path)
        .chain(std::env::split_paths(DEFAULT_PATH))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.into())
}

fn command(
    spec: &ProcessSpec,
    netns: Option<&Netns>,
    keep: Option<&Keep>,
    cgroup: Option<Arc<limits::Cgroup>>,
) -> std::io::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(resolve(&spec.argv[0], &spec.env));
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .envs(&spec.env)
        .stdin(Stdio::null());
    // Kept: output to its log file, which outlives us as it does.
    let record = match keep {
        Some(k) => {
            let log = kept::open_log(&k.log)?;
            cmd.stdout(log.try_clone()?).stderr(log).kill_on_drop(false);
            Some(kept::ChildRecord::new(&k.pidfile)?)
        }
        None => {
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            None
        }
    };
    let entry = netns.map(Netns::child_entry);
    let (uid, gid, open_files) = (spec.uid, spec.gid, spec.limits.open_files);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls: setns(2) first (it needs the
    // capabilities a uid change drops; the namespace's Netns is held by the
    // supervisor across the spawn), then a kept proxy's own pidfile
    // (open/write/close, before the uid change: the directory is ours),
    // then its cgroup (open/write/close) and rlimit (setrlimit(2)), which
    // need our privileges too, then setgroups(2)/setgid(2)/setuid(2) (as std's uid/gid would, but
    // after the setns), then prctl(2) — last, as a credential change clears
    // the parent-death signal — for a proxy that must die with us.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if let Some(e) = &entry {
                e.enter()?;
            }
            if let Some(r) = &record {
                r.write()?;
            }
            if let Some(c) = &cgroup {
                c.join()?;
            }
            if let Some(n) = open_files {
                limits::set_open_files(n)?;
            }
            // No supplementary group of ours goes with a changed identity.
            if (uid.is_some() || gid.is_some()) && libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(g) = gid
                && libc::setgid(g) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(u) = uid
                && libc::setuid(u) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if record.is_none() && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Whether a TCP socket of the calling thread's network namespace listens
/// on `port` (any address, IPv4 or IPv6).
fn listening(port: u16) -> bool {
    // thread-self: the namespace this thread entered, not the process's.
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .any(|table| std::fs::read_to_string(table).is_ok_and(|t| listens_in(&t, port)))
}

/// Whether `/proc/net/tcp`-format `table` has a LISTEN socket on `port`.
fn listens_in(table: &str, port: u16) -> bool {
    const LISTEN: &str = "0A";
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        state == Some(LISTEN)
            && local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

/// One readiness probe, blocking, in `netns` (or ours).
fn probe(ready: &Readiness, netns: Option<&Netns>) -> bool {
    let check = || {
        use std::io::{Read, Write};
        let port = match ready {
            Readiness::Tcp(p) => return listening(*p),
            Readiness::Http { port, .. } => *port,
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let Ok(mut sock) = std::net::TcpStream::connect_timeout(&addr, PROBE_EVERY * 4) else {
            return false;
        };
        let Readiness::Http { path, .. } = ready else {
            return true;
        };
        let _ = sock.set_read_timeout(Some(PROBE_EVERY * 4));
        let ask = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut head = [0u8; 32];
        sock.write_all(ask.as_bytes()).is_ok()
            && sock.read(&mut head).is_ok_and(|n| {
                String::from_utf8_lossy(&head[..n])
                    .split_whitespace()
                    .nth(1)
                    == Some("200")
            })
    };
    match netns {
        Some(ns) => ns.run(check).unwrap_or(false),
        None => check(),
    }
}

/// How one run of the process ended.
enum Ended {
    Stopping,
    Failed(String),
}

/// What one supervised proxy runs and reports to.
struct Run {
    spec: ProcessSpec,
    netns: Option<Arc<Netns>>,
    keep: Option<Keep>,
    tx: watch::Sender<ProxyState>,
    pid: Arc<AtomicU32>,
    stopping: Arc<AtomicBool>,
    adopted: Arc<Mutex<Option<bool>>>,
    /// The name of its cgroup, when its limits need one.
    cgroup_name: String,
    /// Its cgroup, once made.
    made: Mutex<Option<Arc<limits::Cgroup>>>,
}

/// A kept proxy's cgroup is named as its pidfile (a restart finds it
/// again); another's by our pid and a sequence number.
fn cgroup_name(keep: Option<&Keep>) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    keep.and_then(|k| k.pidfile.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| {
            format!(
                "p{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            )
        })
}

/// Where a run's last words are: our pipes' lines, or its log file.
enum Said {
    Pipes(Output, Vec<tokio::task::JoinHandle<()>>),
    /// The log and where this run's output begins in it.
    Log(std::path::PathBuf, u64),
}

impl Said {
    /// Its last lines, once a process that exited has said them (its pipes
    /// read to the end, unless a child of its own keeps them open).
    async fn last(self) -> String {
        match self {
            Said::Pipes(out, readers) => {
                for r in readers {
                    let _ = tokio::time::timeout(Duration::from_millis(500), r).await;
                }
                last_lines(&out)
            }
            Said::Log(log, from) => {
                summary(kept::last_lines(&log, from, KEPT_LINES, MAX_LINE).into_iter())
            }
        }
    }
}

impl Run {
    /// The cgroup its limits need, made now; without one (none needed, or
    /// the kernel does not allow it: logged) it runs without those limits.
    fn cgroup(&self) -> Option<Arc<limits::Cgroup>> {
        if !self.spec.limits.cgroup() {
            return None;
        }
        match limits::Cgroup::prepare(
            std::path::Path::new(limits::CGROUP_ROOT),
            &self.cgroup_name,
            &self.spec.limits,
        ) {
            Ok(c) => {
                let c = Arc::new(c);
                *self.made.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Some(c)
            }
            Err(why) => {
                tracing::warn!(%why, limits = ?self.spec.limits, "the proxy runs without its memory, CPU and process limits");
                None
            }
        }
    }

    /// The end of supervision: its cgroup goes with its process (one we
    /// leave running keeps it).
    fn stopped(&self) {
        if let Some(c) = self.made.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.remove();
        }
        let _ = self.tx.send(ProxyState::Stopped);
    }

    /// Probes readiness once, off the runtime's threads.
    async fn probe(&self) -> bool {
        let (ready, ns) = (self.spec.ready.clone(), self.netns.clone());
        tokio::task::spawn_blocking(move || probe(&ready, ns.as_deref()))
            .await
            .unwrap_or(false)
    }

    fn ready(&self, pid: u32) {
        self.pid.store(pid, Ordering::SeqCst);
        let _ = self.tx.send(ProxyState::Ready { pid });
    }

    /// Waits for `exit` (the running proxy's end); meanwhile a kept proxy's
    /// log is kept below its size limit.
    async fn until_exit<T>(&self, exit: impl std::future::Future<Output = T>) -> T {
        let log = self.keep.as_ref().and_then(|k| kept::open_log(&k.log).ok());
        tokio::pin!(exit);
        loop {
            tokio::select! {
                t = &mut exit => return t,
                () = tokio::time::sleep(TRIM_EVERY) => {
                    if let Some(l) = &log { kept::trim(l); }
                }
            }
        }
    }

    /// A kept proxy that still runs from an earlier run of ours, watched
    /// until it exits; `None`: there is none.
    async fn adopt(&self) -> Option<(Ended, Option<Instant>)> {
        let keep = self.keep.as_ref()?;
        let (spec, ns, pidfile) = (self.spec.clone(), self.netns.clone(), keep.pidfile.clone());
        let a = tokio::task::spawn_blocking(move || kept::adopt(&pidfile, &spec, ns.as_deref()))
            .await
            .ok()??;
        let pid = a.pid;
        self.pid.store(pid, Ordering::SeqCst);
        tracing::info!(
            pid,
            stale = a.stale,
            "adopted the proxy an earlier run started"
        );
        let deadline = Instant::now() + self.spec.start_timeout;
        while !self.probe().await {
            if Instant::now() >= deadline || self.stopping.load(Ordering::SeqCst) {
                terminate(pid, nix::sys::signal::Signal::SIGKILL, Duration::ZERO);
                self.pid.store(0, Ordering::SeqCst);
                return Some((
                    Ended::Failed(format!(
                        "the adopted proxy (pid {pid}) is not ready ({:?})",
                        self.spec.ready
                    )),
                    None,
                ));
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        *self.adopted.lock().unwrap_or_else(|p| p.into_inner()) = Some(a.stale);
        let since = Instant::now();
        self.ready(pid);
        self.until_exit(kept::exited(a.pidfd)).await;
        self.pid.store(0, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            return Some((Ended::Stopping, Some(since)));
        }
        let said = Said::Log(keep.log.clone(), 0).last().await;
        Some((
            Ended::Failed(format!("the adopted proxy (pid {pid}) exited; {said}")),
            Some(since),
        ))
    }

    async fn once(&self) -> (Ended, Option<Instant>) {
        let spec = &self.spec;
        let cgroup = self.cgroup();
        // Where this run's output will begin in a kept proxy's log.
        let from = self
            .keep
            .as_ref()
            .and_then(|k| std::fs::metadata(&k.log).ok())
            .map_or(0, |m| m.len());
        let spawned = command(
            spec,
            self.netns.as_deref(),
            self.keep.as_ref(),
            cgroup.clone(),
        )
        .and_then(|mut c| c.spawn());
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                return (
                    Ended::Failed(format!("cannot start {:?}: {e}", spec.argv[0])),
                    None,
                );
            }
        };
        let pid = child.id().unwrap_or(0);
        self.pid.store(pid, Ordering::SeqCst);
        if let Some(k) = &self.keep
            && let Err(e) = kept::record(&k.pidfile, pid, spec)
        {
            tracing::warn!(pid, pidfile = %k.pidfile.display(), error = %e, "cannot record the proxy; a restart will not adopt it");
        }
        let said = match &self.keep {
            Some(k) => Said::Log(k.log.clone(), from),
            None => {
                let out: Output = Arc::default();
                let mut readers = Vec::new();
                if let Some(o) = child.stdout.take() {
                    readers.push(keep_output(o, out.clone()));
                }
                if let Some(e) = child.stderr.take() {
                    readers.push(keep_output(e, out.clone()));
                }
                Said::Pipes(out, readers)
            }
        };
        tracing::info!(pid, argv = ?spec.argv, "proxy starting");
        let deadline = Instant::now() + spec.start_timeout;
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return (Ended::Stopping, None);
            }
            if let Ok(Some(status)) = child.try_wait() {
                self.pid.store(0, Ordering::SeqCst);
                return (
                    Ended::Failed(format!(
                        "it exited ({status}) before it was ready; {}",
                        said.last().await
                    )),
                    None,
                );
            }
            if self.probe().await {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.pid.store(0, Ordering::SeqCst);
                return (
                    Ended::Failed(format!(
                        "not ready within {:?} ({:?}); {}",
                        spec.start_timeout,
                        spec.ready,
                        said.last().await
                    )),
                    None,
                );
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        let since = Instant::now();
        tracing::info!(pid, "proxy ready");
        self.ready(pid);
        let status = self.until_exit(child.wait()).await;
        self.pid.store(0, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            return (Ended::Stopping, Some(since));
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        (
            Ended::Failed(format!("it exited ({status}); {}", said.last().await)),
            Some(since),
        )
    }
}

async fn supervise(run: Run, last_failure: Arc<Mutex<Option<String>>>, on_start: OnStart) {
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    loop {
        let adopted = if first { run.adopt().await } else { None };
        let (ended, ready_since) = match adopted {
            Some(outcome) => outcome,
            None => {
                if !first {
                    let _ = run.tx.send(ProxyState::Starting);
                }
                on_start(!first);
                run.once().await
            }
        };
        first = false;
        let reason = match ended {
            Ended::Stopping => break,
            Ended::Failed(reason) => reason,
        };
        if ready_since.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
            backoff = MIN_BACKOFF;
        }
        tracing::warn!(%reason, retry_in = ?backoff, "proxy failed; its rules stay, traffic waits for it");
        *last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        let _ = run.tx.send(ProxyState::Restarting { reason });
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if run.stopping.load(Ordering::SeqCst) {
                run.stopped();
                return;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    run.stopped();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_without_connecting_to_it() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 1 1\n   \
             1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(listens_in(table, 15001));
        assert!(
            !listens_in(table, 8080),
            "an established socket is not a listener"
        );
        assert!(!listens_in(table, 15006));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening(port));
        drop(l);
        assert!(!listening(port));
    }
}
