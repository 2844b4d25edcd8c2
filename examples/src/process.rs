//! Child processes that are stopped on drop, each logging (stdout and
//! stderr) to its own file, and the work directory that holds the logs and
//! sockets. Children get their own process group, so a Ctrl-C in the
//! terminal reaches only the orchestrator, which then stops them in order.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cancel;

/// How often waits look again.
const POLL: Duration = Duration::from_millis(10);
/// How long a process gets to exit after SIGTERM before SIGKILL (on drop).
const GRACE: Duration = Duration::from_secs(3);
/// Log lines quoted in errors.
const TAIL_LINES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) while we waited for {what}; its log ends: {tail}")]
    Exited {
        name: String,
        what: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("{name}: no {what} after {after:?}; its log ends: {tail}")]
    Timeout {
        name: String,
        what: String,
        after: Duration,
        tail: String,
    },
    #[error(transparent)]
    Cancelled(#[from] cancel::Cancelled),
}

/// A scratch directory (`/tmp/mp-demo-<pid>-<n>`) for sockets and logs,
/// removed on drop unless `MP_KEEP_LOGS` is set.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn create() -> Result<WorkDir, ProcessError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // Short: unix socket paths are limited to 107 bytes.
        let path = std::env::temp_dir().join(format!("mp-demo-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| ProcessError::File {
            path: path.clone(),
            source,
        })?;
        Ok(WorkDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directories of processes that died before their guard
    /// ran (`mp-demo-<pid>-<n>` whose pid is gone).
    pub fn sweep_stale() {
        let entries = std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten();
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("mp-demo-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("MP_KEEP_LOGS").is_some() {
            eprintln!("logs kept in {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running child, stopped (SIGTERM, then SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `cmd` with stdin closed and stdout + stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Process, ProcessError> {
        let file = |path: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ProcessError::File {
                    path: path.to_owned(),
                    source,
                })
        };
        let out = file(log)?;
        let err = out.try_clone().map_err(|source| ProcessError::File {
            path: log.to_owned(),
            source,
        })?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                name: name.to_owned(),
                program: cmd.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        Ok(Process {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, joined with " | " for one-line errors.
    pub fn tail(&self) -> String {
        tail(&self.log(), TAIL_LINES)
    }

    /// The exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until a log line satisfies `pred` and returns it. Fails when the
    /// process exits first, after `timeout`, or on Ctrl-C.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, ProcessError> {
        self.wait_until(what, timeout, |p| {
            p.log().lines().find(|l| pred(l)).map(str::to_owned)
        })
    }

    /// Waits until `path` exists (e.g. the socket a server listens on).
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> Result<(), ProcessError> {
        let what = path.display().to_string();
        self.wait_until(&what, timeout, |_| path.exists().then_some(()))
    }

    /// Polls `check` until it gives a value, the process exits, `timeout`
    /// passes or Ctrl-C.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check(self) {
                return Ok(v);
            }
            if let Some(status) = self.try_status() {
                // It may have produced the value just before exiting.
                if let Some(v) = check(self) {
                    return Ok(v);
                }
                return Err(ProcessError::Exited {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    status,
                    tail: self.tail(),
                });
            }
            cancel::check()?;
            if Instant::now() >= deadline {
                return Err(ProcessError::Timeout {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::Timeout {
                    name: self.name.clone(),
                    what: "exit".into(),
                    after: timeout,
                    tail: self.tail(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` (no-op once it has exited).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_status().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        self.signal(Signal::SIGTERM);
        self.wait(timeout)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        if self.terminate(GRACE).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `n` lines of `text`, joined with " | ", colours removed.
pub fn tail(text: &str, n: usize) -> String {
    let plain = strip_ansi(text);
    let lines: Vec<&str> = plain.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines[start..].join(" | ")
}

/// `text` without ANSI escape sequences (`ESC [ … letter`), which some
/// loggers write even into files.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where the workspace's binaries are: the directory of the running
/// executable (`target/<profile>/`), or its parent for tests and benches
/// (`target/<profile>/deps/`). They come from `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail("", 3), "(empty)");
        assert_eq!(
            tail("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x", 1),
            "time  INFO x"
        );
    }
}
