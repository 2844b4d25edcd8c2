//! `forwarder-plugin rules …`: output, exit codes, and bad input that is
//! refused with a clear message while the namespace stays exactly as it was.

mod redirect_common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use nsm_tests::netns::TestNetns;
use nsm_tests::process::bin;
use redirect_common::{assert_same, state};

fn rules(args: &[&str]) -> Output {
    Command::new(bin("forwarder-plugin"))
        .arg("rules")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run forwarder-plugin")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A spec file in a directory of its own, removed on drop.
struct SpecFile {
    dir: PathBuf,
    pub path: String,
}

impl SpecFile {
    fn new(name: &str, content: &str) -> Self {
        let dir = std::env::temp_dir().join(nsm_tests::unique("spec"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        SpecFile {
            path: path.display().to_string(),
            dir,
        }
    }
}

impl Drop for SpecFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn help_documents_subcommands_and_exit_codes() {
    let o = rules(&["--help"]);
    assert_eq!(code(&o), 0);
    let h = text(&o.stdout);
    for want in [
        "render",
        "apply",
        "verify",
        "reconcile",
        "cleanup",
        "Exit codes",
        "64",
        "65",
        "70",
    ] {
        assert!(h.contains(want), "{want:?} missing in\n{h}");
    }
    let o = rules(&["apply", "--help"]);
    let h = text(&o.stdout);
    for want in [
        "--netns",
        "--spec",
        "--backend",
        "--iptables-variant",
        "nft",
        "iptables",
        "legacy",
    ] {
        assert!(h.contains(want), "{want:?} missing in\n{h}");
    }
}

#[test]
fn render_prints_what_would_be_applied() {
    let spec = SpecFile::new(
        "spec.yaml",
        "captureDns: true\nexcludeOutboundPorts: [9090]\n",
    );
    let o = rules(&["render", "--spec", &spec.path]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let nft = text(&o.stdout);
    assert!(nft.starts_with("add table inet mesh_proxy\n"), "{nft}");
    assert!(nft.contains("meta l4proto tcp redirect to :15001"), "{nft}");
    assert!(nft.contains("udp dport 53 redirect to :15053"), "{nft}");
    assert!(nft.contains("tcp dport 9090 return"), "{nft}");

    let o = rules(&[
        "render",
        "--spec",
        &spec.path,
        "--backend",
        "iptables",
        "--owner",
        "mp2",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let xt = text(&o.stdout);
    assert!(
        xt.contains("*nat\n") && xt.contains("COMMIT\n") && xt.contains("*raw\n"),
        "{xt}"
    );
    assert!(
        xt.contains("-A MP2_REDIRECT -p tcp -m comment --comment mp2:"),
        "{xt}"
    );
    assert!(xt.contains("-j CT --zone 2"), "{xt}");

    // stdin works too.
    let mut child = Command::new(bin("forwarder-plugin"))
        .args(["rules", "render", "--spec", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"outboundPort": 15101}"#)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(text(&o.stdout).contains("redirect to :15101"));
}

#[test]
fn apply_verify_reconcile_cleanup_exit_codes() {
    if !nsm_tests::require_root("apply_verify_reconcile_cleanup_exit_codes") {
        return;
    }
    let ns = TestNetns::new("cli");
    let spec = SpecFile::new("spec.json", r#"{"version": 1, "captureDns": true}"#);
    for backend in ["nft", "iptables"] {
        let args = |verb: &'static str| {
            vec![
                verb,
                "--netns",
                ns.name(),
                "--spec",
                spec.path.as_str(),
                "--backend",
                backend,
            ]
        };
        let o = rules(&args("apply"));
        assert_eq!(code(&o), 0, "{backend}: {}", text(&o.stderr));
        assert_eq!(code(&rules(&args("verify"))), 0, "{backend}");
        // Delete our whole DNS chain's rules by hand: verify exits 1 and says what.
        if backend == "nft" {
            ns.exec_ok(&[
                "nft",
                "flush",
                "chain",
                "inet",
                "mesh_proxy",
                "nat_output_dns",
            ]);
        } else {
            ns.exec_ok(&["iptables-nft", "-t", "nat", "-F", "MESH_PROXY_OUTPUT_DNS"]);
        }
        let o = rules(&args("verify"));
        assert_eq!(code(&o), 1, "{backend}");
        let out = text(&o.stdout);
        assert!(
            out.contains("missing rule in") && out.contains("53"),
            "{out}"
        );
        assert_eq!(code(&rules(&args("reconcile"))), 0);
        assert_eq!(code(&rules(&args("verify"))), 0, "{backend}");
        let o = rules(&["cleanup", "--netns", ns.name(), "--backend", backend]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        let o = rules(&args("verify"));
        assert_eq!(code(&o), 1);
        assert!(
            !state(&ns).mentions_ours(),
            "{backend}: something of ours is left"
        );
    }
}

#[test]
fn forced_legacy_variant_is_used_and_cleaned() {
    if !nsm_tests::require_root("forced_legacy_variant_is_used_and_cleaned") {
        return;
    }
    let ns = TestNetns::new("cli");
    let spec = SpecFile::new("spec.json", "{}");
    let o = rules(&[
        "apply",
        "--netns",
        &ns.path(),
        "--spec",
        &spec.path,
        "--backend",
        "iptables",
        "--iptables-variant",
        "legacy",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(
        ns.exec_ok(&["iptables-legacy-save"])
            .contains("-j MESH_PROXY_OUTPUT")
    );
    assert!(!ns.exec_ok(&["iptables-nft-save"]).contains("MESH_PROXY"));
    let o = rules(&["cleanup", "--netns", &ns.path(), "--backend", "iptables"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert!(!state(&ns).mentions_ours());
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !nsm_tests::require_root("bad_input_is_refused_and_changes_nothing") {
        return;
    }
    let ns = TestNetns::new("cli");
    let good = SpecFile::new("good.json", "{}");
    let before = state(&ns);
    let bad_specs = [
        (r#"{"outbondPort": 15001}"#, "unknown field `outbondPort`"),
        (r#"{"inboundPort": 70000}"#, "port 70000 out of range"),
        (
            r#"{"excludeOutboundCidrs": ["10.0.0.0/33"]}"#,
            "is not a CIDR",
        ),
        (r#"{"excludeOutboundCidrs": ["10.0.0/8"]}"#, "is not a CIDR"),
        (r#"{"excludeInterfaces": ["eth0/1"]}"#, "excludeInterfaces"),
        (
            r#"{"excludeInterfaces": ["averyveryverylongname"]}"#,
            "excludeInterfaces",
        ),
        (r#"{"excludeInterfaces": ["eth 0"]}"#, "excludeInterfaces"),
        (
            r#"{"excludeInterfaces": ["eth\u0007"]}"#,
            "excludeInterfaces",
        ),
        ("mode: sideways\n", "unknown variant `sideways`"),
        (r#"{"version": 9}"#, "unsupported spec version 9"),
    ];
    for (content, why) in bad_specs {
        let spec = SpecFile::new("bad.json", content);
        for verb in ["apply", "verify", "reconcile", "cleanup"] {
            for backend in ["nft", "iptables"] {
                let o = rules(&[
                    verb,
                    "--netns",
                    ns.name(),
                    "--spec",
                    &spec.path,
                    "--backend",
                    backend,
                ]);
                assert_eq!(code(&o), 64, "{verb} {content}: {}", text(&o.stderr));
                let err = text(&o.stderr);
                assert!(err.contains(why), "{verb} {content}: {err}");
            }
        }
    }
    let netns_cases = [
        ("no-such-netns-x1", "not found"),
        ("/etc/hostname", "not a network namespace"),
        ("/proc/self/ns/uts", "not a network namespace"),
        ("inode://1/2", "not found"),
        ("bad name", "invalid network namespace name"),
    ];
    for (netns, why) in netns_cases {
        let o = rules(&["apply", "--netns", netns, "--spec", &good.path]);
        assert_eq!(code(&o), 65, "{netns}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(why),
            "{netns}: {}",
            text(&o.stderr)
        );
    }
    let o = rules(&[
        "apply",
        "--netns",
        ns.name(),
        "--spec",
        "/nonexistent/spec.json",
    ]);
    assert_eq!(code(&o), 66, "{}", text(&o.stderr));
    let o = rules(&[
        "apply",
        "--netns",
        ns.name(),
        "--spec",
        &good.path,
        "--backend",
        "ebpf",
    ]);
    assert_eq!(code(&o), 2);
    let o = rules(&[
        "apply",
        "--netns",
        ns.name(),
        "--spec",
        &good.path,
        "--owner",
        "Bad-Name",
    ]);
    assert_eq!(code(&o), 2);
    let o = rules(&["apply", "--spec", &good.path]);
    assert_eq!(code(&o), 2, "--netns is required");
    assert_same(
        &before,
        &state(&ns),
        "bad input must leave the namespace as it was",
    );
}
