//! A proxy's resource limits (`limits:` in its definition). Open files are
//! an rlimit, set in the child before it runs. Memory, CPU and process
//! count need cgroup v2: each proxy gets a cgroup of its own under ours
//! (`<our cgroup>/mesh-proxies/<name>`), which the child joins before it
//! runs. cgroup v2 gives a cgroup with processes no controlled children,
//! so, as container runtimes do, we first move ourselves into a leaf
//! (`<our cgroup>/agent`). Where the kernel does not allow it (cgroup v1,
//! no delegation, a read-only cgroupfs) the proxy runs without those
//! limits and the reason is logged: a limit never keeps a proxy, and so
//! the traffic it carries, from running.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the cgroup v2 hierarchy is mounted in unified mode.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The subtree of our cgroup that holds the proxies' cgroups.
const PROXIES: &str = "mesh-proxies";
/// The leaf we move into so that our cgroup may have controlled children.
const AGENT: &str = "agent";
const MAX_OPEN_FILES: u64 = 1 << 20;
const MIN_OPEN_FILES: u64 = 16;
const MIN_MEMORY: u64 = 4 << 20;
const MAX_PIDS: u64 = 1 << 22;
/// cgroup v2's cpu.max period (µs).
const CPU_PERIOD: u64 = 100_000;
const MAX_CPU_MILLIS: u64 = 1024 * 1000;

/// `limits:` as configured; quantities as Kubernetes writes them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsConfig {
    /// RLIMIT_NOFILE (soft and hard).
    pub open_files: Option<u64>,
    /// memory.max, e.g. `256Mi`.
    pub memory: Option<String>,
    /// cpu.max in cores, e.g. `500m` or `2`.
    pub cpu: Option<String>,
    /// pids.max: processes and threads.
    pub pids: Option<u64>,
}

/// Checked limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Limits {
    pub open_files: Option<u64>,
    pub memory: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub pids: Option<u64>,
}

impl Limits {
    /// Whether a cgroup is needed.
    pub fn cgroup(&self) -> bool {
        self.memory.is_some() || self.cpu_millis.is_some() || self.pids.is_some()
    }

    /// The cgroup v2 controllers these limits need (each file's prefix).
    fn controllers(&self) -> Vec<&'static str> {
        self.files()
            .into_iter()
            .filter_map(|(file, _)| file.split('.').next())
            .collect()
    }

    /// The cgroup v2 files and values that set these limits.
    fn files(&self) -> Vec<(&'static str, String)> {
        let mut f = Vec::new();
        if let Some(m) = self.memory {
            f.push(("memory.max", m.to_string()));
        }
        if let Some(c) = self.cpu_millis {
            f.push(("cpu.max", format!("{} {CPU_PERIOD}", c * CPU_PERIOD / 1000)));
        }
        if let Some(p) = self.pids {
            f.push(("pids.max", p.to_string()));
        }
        f
    }
}

/// A byte quantity: `1048576`, `512Ki`, `256Mi`, `1Gi`, `100M`, `1G`.
pub fn bytes(text: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let t = text.trim();
    let (num, unit) = UNITS
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((t, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a byte quantity (e.g. 256Mi)"))
}

/// A CPU quantity in millicores: `500m`, `1`, `1.5`.
pub fn millicores(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("{text:?} is not a CPU quantity (e.g. 500m or 2)");
    if let Some(m) = t.strip_suffix('m') {
        return m.parse().map_err(|_| bad());
    }
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(1000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

impl LimitsConfig {
    pub fn check(&self) -> Result<Limits, String> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(format!("limits.{key}: {v} is outside {lo}..={hi}"))
            }
        };
        Ok(Limits {
            open_files: self
                .open_files
                .map(|v| range("openFiles", v, MIN_OPEN_FILES, MAX_OPEN_FILES))
                .transpose()?,
            memory: self
                .memory
                .as_deref()
                .map(|m| {
                    let b = bytes(m).map_err(|e| format!("limits.memory: {e}"))?;
                    range("memory", b, MIN_MEMORY, u64::MAX)
                })
                .transpose()?,
            cpu_millis: self
                .cpu
                .as_deref()
                .map(|c| {
                    let m = millicores(c).map_err(|e| format!("limits.cpu: {e}"))?;
                    range("cpu (millicores)", m, 1, MAX_CPU_MILLIS)
                })
                .transpose()?,
            pids: self
                .pids
                .map(|v| range("pids", v, 1, MAX_PIDS))
                .transpose()?,
        })
    }
}

/// A proxy's cgroup, made before the spawn; the child joins it.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, ready for the child (no allocation after fork).
    procs: CString,
}

impl Cgroup {
    /// Makes (or reuses) cgroup `name` for `limits` under our own cgroup in
    /// the hierarchy at `root`; the error says why the kernel does not allow it.
    pub fn prepare(root: &Path, name: &str, limits: &Limits) -> Result<Cgroup, String> {
        if !root.join("cgroup.controllers").exists() {
            return Err(format!(
                "no cgroup v2 hierarchy at {} (cgroup v1 or hybrid mode)",
                root.display()
            ));
        }
        let own = own_cgroup()?;
        let ours = root.join(own.trim_start_matches('/'));
        let wanted = limits.controllers();
        let proxies = ours.join(PROXIES);
        let dir = proxies.join(name);
        if !dir.exists() {
            delegate(&ours, &proxies, &wanted)?;
            mkdir(&dir)?;
        }
        for (file, value) in limits.files() {
            std::fs::write(dir.join(file), &value)
                .map_err(|e| format!("{}: {value}: {e}", dir.join(file).display()))?;
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .map_err(|_| "a cgroup path with a NUL byte".to_owned())?;
        Ok(Cgroup { dir, procs })
    }

    /// Moves the calling process into the cgroup. Async-signal-safe (for
    /// `pre_exec`): open, write, close.
    pub fn join(&self) -> std::io::Result<()> {
        // SAFETY: a valid C string; the fd is closed on every path.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 2 {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Removes the cgroup once its process has gone (best effort: a
    /// process still in it keeps it).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn mkdir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// Our cgroup v2 path (`0::/path` in /proc/self/cgroup).
fn own_cgroup() -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| "no cgroup v2 entry in /proc/self/cgroup".into())
}

/// Enables `wanted` for `proxies` (under `ours`): in `ours`' subtree
/// control, after moving our processes into a leaf if the kernel refuses
/// it to a cgroup that has processes, then in `proxies`' own.
fn delegate(ours: &Path, proxies: &Path, wanted: &[&str]) -> Result<(), String> {
    let enable = |dir: &Path| -> std::io::Result<()> {
        let line = wanted
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(dir.join("cgroup.subtree_control"), line)
    };
    let available = std::fs::read_to_string(ours.join("cgroup.controllers")).unwrap_or_default();
    if let Some(missing) = wanted
        .iter()
        .find(|c| !available.split_whitespace().any(|a| a == **c))
    {
        return Err(format!(
            "the {missing} controller is not delegated to {}",
            ours.display()
        ));
    }
    if let Err(e) = enable(ours) {
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!("{}/cgroup.subtree_control: {e}", ours.display()));
        }
        // Processes in our cgroup: ours move into a leaf first.
        let agent = ours.join(AGENT);
        mkdir(&agent)?;
        std::fs::write(agent.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("moving us into {}: {e}", agent.display()))?;
        if let Err(e) = enable(ours) {
            // Others share our cgroup: back where we were, nothing left.
            let _ = std::fs::write(ours.join("cgroup.procs"), std::process::id().to_string());
            let _ = std::fs::remove_dir(&agent);
            return Err(format!(
                "{}/cgroup.subtree_control: {e} (other processes share our cgroup)",
                ours.display()
            ));
        }
    }
    mkdir(proxies)?;
    enable(proxies).map_err(|e| format!("{}/cgroup.subtree_control: {e}", proxies.display()))
}

/// Sets RLIMIT_NOFILE in the calling process. Async-signal-safe.
pub fn set_open_files(n: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a plain system call on a local struct.
    #[allow(unsafe_code)]
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        assert_eq!(bytes("256Mi"), Ok(256 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("4096"), Ok(4096));
        assert!(bytes("lots").is_err());
        assert!(bytes("99999999999Ti").is_err());
        assert_eq!(millicores("500m"), Ok(500));
        assert_eq!(millicores("1.5"), Ok(1500));
        assert_eq!(millicores("2"), Ok(2000));
        assert!(millicores("0.0001").is_err());
        assert!(millicores("half").is_err());
    }

    #[test]
    fn limits_are_checked_and_rendered_for_cgroup_v2() {
        let c: LimitsConfig =
            serde_norway::from_str("{openFiles: 4096, memory: 256Mi, cpu: 500m, pids: 64}")
                .unwrap();
        let l = c.check().unwrap();
        assert!(l.cgroup());
        assert_eq!(
            l.files(),
            [
                ("memory.max", (256u64 << 20).to_string()),
                ("cpu.max", "50000 100000".to_owned()),
                ("pids.max", "64".to_owned()),
            ]
        );
        let bad = |y: &str| {
            serde_norway::from_str::<LimitsConfig>(y)
                .map_err(|e| e.to_string())
                .and_then(|c| c.check())
                .unwrap_err()
        };
        assert!(bad("{openFiles: 3}").contains("openFiles"));
        assert!(bad("{memory: 1Ki}").contains("memory"));
        assert!(bad("{cpu: 0m}").contains("cpu"));
        assert!(bad("{swap: 1Gi}").contains("swap"));
        assert!(!LimitsConfig::default().check().unwrap().cgroup());
    }

    #[test]
    fn without_cgroup_v2_the_reason_is_given() {
        let dir = std::env::temp_dir().join(format!("no-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = Limits {
            memory: Some(64 << 20),
            ..Default::default()
        };
        let e = Cgroup::prepare(&dir, "p", &l).unwrap_err();
        assert!(e.contains("no cgroup v2 hierarchy"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
