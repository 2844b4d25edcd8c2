//! deploy/image/Dockerfile without a container engine: its runtime stage
//! installs the Debian package of every shared library `ldd` shows for our
//! binaries and of every program the rule backends run, its images carry a
//! version label and pinned bases — and, where an engine answers, each
//! target builds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use nsm_tests::process::bin;

const BINARIES: [&str; 3] = ["mesh-proxy-nse", "forwarder-plugin", "nsc-init"];
/// What the backends run (forwarder_plugin::rules): iptables-restore/-save
/// for both families, ip for policy routes.
const PROGRAMS: [&str; 5] = [
    "iptables-restore",
    "iptables-save",
    "ip6tables-restore",
    "ip6tables-save",
    "ip",
];
/// Packages every debian-slim image has (Priority: required).
const BASE: [&str; 2] = ["libc6", "libgcc-s1"];

fn dockerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/Dockerfile")
}

/// The Dockerfile's instructions, continuation lines joined.
fn instructions() -> Vec<String> {
    let text = std::fs::read_to_string(dockerfile()).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur).trim().to_owned());
                continue;
            }
        }
        cur.push(' ');
    }
    out
}

/// The instructions of stage `name` (`FROM … AS name` to the next FROM).
fn stage(name: &str) -> Vec<String> {
    let all = instructions();
    let start = all
        .iter()
        .position(|i| i.starts_with("FROM ") && i.ends_with(&format!(" AS {name}")))
        .unwrap_or_else(|| panic!("no stage {name}"));
    all[start + 1..]
        .iter()
        .take_while(|i| !i.starts_with("FROM "))
        .cloned()
        .collect()
}

/// Packages the stage's `apt-get install` lines name.
fn installed(stage: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for i in stage.iter().filter(|i| i.starts_with("RUN ")) {
        for cmd in i.split("&&") {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if let Some(p) = words.iter().position(|w| *w == "install")
                && words[..p].contains(&"apt-get")
            {
                out.extend(
                    words[p + 1..]
                        .iter()
                        .filter(|w| !w.starts_with('-'))
                        .map(|w| w.to_string()),
                );
            }
        }
    }
    out
}

/// The Debian package owning `path` (any of its names: merged /usr,
/// alternatives' symlinks).
fn package_of(path: &Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut candidates = vec![path.to_owned(), real.clone()];
    for p in [path, real.as_path()] {
        let s = p.to_str().unwrap();
        match s.strip_prefix("/usr") {
            Some(rest) => candidates.push(PathBuf::from(rest)),
            None => candidates.push(PathBuf::from(format!("/usr{s}"))),
        }
    }
    for c in &candidates {
        let out = Command::new("dpkg").arg("-S").arg(c).output().unwrap();
        if out.status.success() {
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            let pkg = line.split(':').next().unwrap().trim().to_owned();
            return pkg;
        }
    }
    panic!("no Debian package owns {} ({candidates:?})", path.display());
}

/// The shared libraries `ldd` resolves for `binary`.
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().unwrap();
    assert!(out.status.success(), "ldd {}", binary.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let target = l.split("=>").nth(1).unwrap_or(l).trim();
            let path = target.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[test]
fn the_runtime_stage_installs_what_the_binaries_link_and_run() {
    if Command::new("dpkg").arg("--version").output().is_err() {
        assert!(
            !nsm_tests::in_ci(),
            "dpkg missing: CI runs on Debian, so this is a failure"
        );
        eprintln!("SKIPPED: no dpkg to map libraries to Debian packages");
        return;
    }
    let runtime = installed(&stage("runtime"));
    let have = |pkg: &str| runtime.contains(pkg) || BASE.contains(&pkg);
    let mut needed = BTreeSet::new();
    for b in BINARIES {
        let libs = libraries(&bin(b));
        assert!(!libs.is_empty(), "ldd shows nothing for {b}");
        for lib in libs {
            let pkg = package_of(&lib);
            assert!(
                have(&pkg),
                "{b} links {} from {pkg}, which the runtime stage does not install ({runtime:?})",
                lib.display()
            );
            needed.insert(pkg);
        }
    }
    assert!(
        needed.contains("libnftnl11") && needed.contains("libmnl0"),
        "the rule backends link libnftnl and libmnl: {needed:?}"
    );
    for p in PROGRAMS {
        let path = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(p))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{p} is not installed here (tests/install-deps.sh)"));
        let pkg = package_of(&path);
        assert!(
            have(&pkg),
            "the backends run {p} from {pkg}, which the runtime stage does not install ({runtime:?})"
        );
        needed.insert(pkg);
    }
    // Nothing installed that nothing needs.
    let extra: Vec<_> = runtime.iter().filter(|p| !needed.contains(*p)).collect();
    assert!(
        extra.is_empty(),
        "the runtime stage installs {extra:?}, which no binary links or runs"
    );
}

#[test]
fn images_are_labelled_and_their_bases_pinned() {
    let all = instructions();
    for i in all.iter().filter(|i| i.starts_with("FROM ")) {
        let image = i.split_whitespace().nth(1).unwrap();
        if !image.contains('/') {
            continue; // an earlier stage
        }
        assert!(
            image.contains(':') && !image.ends_with(":latest"),
            "unpinned base: {i}"
        );
    }
    let runtime = stage("runtime").join("\n");
    assert!(
        runtime.contains("org.opencontainers.image.version="),
        "no version label: {runtime}"
    );
    for b in BINARIES {
        let s = stage(b).join("\n");
        assert!(
            s.contains(&format!("/out/{b} "))
                && s.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{b}\"")),
            "stage {b} must copy and run its binary: {s}"
        );
    }
}

/// With a container engine, every target builds (minutes: a release build
/// in a fresh container); elsewhere skipped with the reason.
#[test]
fn every_target_builds_where_an_engine_answers() {
    let engine = ["docker", "podman"].into_iter().find(|e| {
        Command::new(e)
            .arg("info")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(engine) = engine else {
        eprintln!(
            "SKIPPED: no container engine answers `info` here; the Dockerfile is checked without one above"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for b in BINARIES {
        let out = Command::new(engine)
            .current_dir(&root)
            .args(["build", "-f", "deploy/image/Dockerfile", "--target", b])
            .args(["-t", &format!("{b}:test"), "."])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{engine} build --target {b}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
