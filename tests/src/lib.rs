//! Shared harness for the real-kernel integration suites: root/CI guards,
//! namespaces that remove themselves, and the workspace's binaries.

#![forbid(unsafe_code)]

pub mod netns;
pub mod process;
pub mod topology;

/// Whether a root-only test can run here. Under `CI=true` a missing
/// prerequisite is a failure (never a silent pass); elsewhere the test prints
/// why it is skipped and returns early.
pub fn require_root(test: &str) -> bool {
    let is_root = nix_is_root();
    if is_root {
        return true;
    }
    let why = format!("{test}: needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create namespaces");
    if in_ci() {
        panic!("{why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// Like [`require_root`], for a command-line tool the test needs (e.g. `haproxy`).
pub fn require_tool(test: &str, tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).is_file());
    if found {
        return true;
    }
    let why = format!("{test}: needs `{tool}` (run tests/run.sh, which installs it)");
    if in_ci() {
        panic!("{why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// Waits until `f` holds, at most `within` (checked every 50 ms); whether
/// it did.
pub fn eventually(within: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A name unique to this process and call, short enough for interface names
/// when `prefix` is at most 5 bytes (`prefix` + 9 hex digits ≤ 15).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!("{prefix}{:05x}{:04x}", pid & 0xfffff, n & 0xffff)
}

/// A program tests/run.sh builds with Go into the target directory (beside
/// the workspace's binaries), or `None` (skipped, with the reason) where it
/// is not built outside CI; under CI=true its absence is a failure.
pub fn go_bin(name: &str, source: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join(name);
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} not built: tests/run.sh builds it from {source} with Go",
        path.display()
    );
    if in_ci() {
        panic!("{why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {why}");
    None
}

/// `GET /metrics` from a Prometheus endpoint at `addr` (host:port): the
/// whole response, which must be a 200.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics port");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The value of the first sample of `series` (name and labels, as
/// exposed) in a scrape.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}
