//! Named network namespaces that delete themselves: the demo's `client`,
//! `nse` and `server`, and every test's. Made with
//! [`Netns::create_named`] (as `ip netns add` does, so `ip netns exec` and
//! `ip -n` work on them too) and removed on drop, also on failure or Ctrl-C.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use forwarder_plugin::netns::{Netns, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot run {argv:?} in {ns}: {source}")]
    Spawn {
        ns: String,
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("{argv:?} in {ns} failed ({status}): {stderr}")]
    Failed {
        ns: String,
        argv: Vec<String>,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A named network namespace under `/run/netns`, deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    netns: Netns,
    /// Drop kills what still runs inside (proxies a node agent left).
    kill_strays: bool,
}

/// `<prefix>-<pid>` for the first namespace of a prefix in this process,
/// `<prefix>-<pid>-<n>` after that: unique per process and readable.
pub fn unique_name(prefix: &str) -> String {
    static SEEN: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let n = seen.entry(prefix.to_owned()).or_insert(0);
    *n += 1;
    let pid = std::process::id();
    if *n == 1 {
        format!("{prefix}-{pid}")
    } else {
        format!("{prefix}-{pid}-{}", *n - 1)
    }
}

/// Prefixes of the namespaces this crate makes.
pub const PREFIXES: [&str; 3] = ["mp-client", "mp-nse", "mp-server"];

/// The pid in a name made by [`unique_name`] from one of `prefixes`.
fn owner_pid(name: &str, prefixes: &[&str]) -> Option<u32> {
    let rest = prefixes
        .iter()
        .find_map(|p| name.strip_prefix(p)?.strip_prefix('-'))?;
    let pid = rest.split('-').next()?;
    let n_ok = rest.split('-').skip(1).all(|n| n.parse::<u32>().is_ok());
    if n_ok { pid.parse().ok() } else { None }
}

/// Deletes namespaces left by a demo or test process that was killed
/// before its guards ran (SIGKILL, abort): names from [`PREFIXES`] whose
/// process no longer exists. Returns the names deleted.
pub fn sweep_stale() -> Vec<String> {
    let mut gone = Vec::new();
    let entries = std::fs::read_dir(forwarder_plugin::netns::NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .flatten();
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name, &PREFIXES) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_processes_in(&name);
        if Netns::delete_named(&name).is_ok() {
            gone.push(name);
        }
    }
    gone
}

impl Namespace {
    /// Creates a namespace named [`unique_name`]`(prefix)` with `lo` up.
    pub fn create(prefix: &str) -> Result<Namespace, NamespaceError> {
        let name = unique_name(prefix);
        let netns = Netns::create_named(&name)?;
        let ns = Namespace {
            name,
            netns,
            kill_strays: true,
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace's name as a dying pod's runtime does, leaving
    /// whatever still runs inside to whoever must notice (the node agent
    /// stopping the proxies it put there).
    pub fn delete_leaving_processes(mut self) {
        self.kill_strays = false;
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// A command whose process starts inside this namespace (setns between
    /// fork and exec; this process's threads stay where they are).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.netns.enter_in_child(&mut cmd);
        cmd
    }

    /// Runs `argv` in the namespace; its stdout, or an error with its stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<String, NamespaceError> {
        let owned = || argv.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let out = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NamespaceError::Spawn {
                ns: self.name.clone(),
                argv: owned(),
                source,
            })?;
        if !out.status.success() {
            return Err(NamespaceError::Failed {
                ns: self.name.clone(),
                argv: owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip <args>` in the namespace, `args` split at whitespace.
    pub fn ip(&self, args: &str) -> Result<String, NamespaceError> {
        let mut argv = vec!["ip"];
        argv.extend(args.split_whitespace());
        self.exec(&argv)
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay there).
    pub fn run<F, R>(&self, f: F) -> Result<R, NamespaceError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        Ok(self.netns.run(f)?)
    }
}

/// SIGKILLs every process in the named namespace but ours: a process that
/// outlives its test (a proxy a node agent keeps) would keep it alive.
pub fn kill_processes_in(name: &str) {
    for pid in crate::inspect::pids_in(name) {
        if pid != std::process::id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if self.kill_strays {
            kill_processes_in(&self.name);
        }
        // The kernel frees the namespace once the last holder is gone: our fd
        // (closed right after this) and the processes the guards have stopped.
        if let Err(e) = Netns::delete_named(&self.name) {
            eprintln!("warning: cannot delete namespace {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("mp-client-123", &PREFIXES), Some(123));
        assert_eq!(owner_pid("mp-nse-123-4", &PREFIXES), Some(123));
        assert_eq!(owner_pid("mp-client-x", &PREFIXES), None);
        assert_eq!(owner_pid("mp-client-1-x", &PREFIXES), None);
        assert_eq!(owner_pid("pod123", &PREFIXES), None);
        let name = unique_name("mp-server");
        assert_eq!(owner_pid(&name, &PREFIXES), Some(std::process::id()));
    }
}
