//! deploy/: every kustomization renders (kustomize's own library, in
//! tests/go/kustomize-render, which also decodes every object strictly
//! against its Kubernetes type and NSM's NetworkService shape), every
//! volume names something that exists, our images are pinned, and every
//! container of ours passes its binary's `--check-config` with the
//! environment and files the manifest gives it — so a manifest can never
//! again start a binary that exits 64 — and every exec probe of theirs is a
//! command the binary takes with that environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// Our images and the binary (and arguments before the container's) that
/// runs in each.
const OURS: [(&str, &str); 3] = [
    ("mesh-proxy-nse:", "mesh-proxy-nse"),
    ("forwarder-plugin:", "forwarder-plugin"),
    ("nsc-init:", "nsc-init"),
];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every directory under deploy/ with a kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.join("kustomization.yaml").is_file() {
            out.push(dir.to_owned());
        }
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &mut out);
    out.sort();
    out
}

fn render(tool: &Path, dir: &Path) -> Vec<serde_norway::Value> {
    let out = Command::new(tool).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{} does not render: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a serde_norway::Value, path: &[&str]) -> Option<&'a serde_norway::Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_of(v: &serde_norway::Value, path: &[&str]) -> String {
    s(v, path)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

fn seq<'a>(v: &'a serde_norway::Value, path: &[&str]) -> Vec<&'a serde_norway::Value> {
    s(v, path)
        .and_then(|v| v.as_sequence())
        .map(|q| q.iter().collect())
        .unwrap_or_default()
}

/// `$(NAME)` references expanded from `env`, as the kubelet does.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Runs one container of ours through `--check-config`: its env (fieldRefs
/// as a kubelet would fill them), its ConfigMap volumes written to a scratch
/// directory, and every env value or file naming a mount path pointed there.
fn check_container(
    dir: &Path,
    pod: &serde_norway::Value,
    container: &serde_norway::Value,
    config_maps: &BTreeMap<String, serde_norway::Value>,
    binary: &str,
) -> (Vec<Probe>, PathBuf) {
    let scratch = std::env::temp_dir().join(nsm_tests::unique("deploy-check-"));
    std::fs::create_dir_all(&scratch).unwrap();
    let volumes: BTreeMap<String, &serde_norway::Value> = seq(pod, &["volumes"])
        .into_iter()
        .map(|v| (str_of(v, &["name"]), v))
        .collect();
    let (mut mounts, mut files) = (Vec::new(), Vec::new());
    for m in seq(container, &["volumeMounts"]) {
        let (name, path) = (str_of(m, &["name"]), str_of(m, &["mountPath"]));
        let local = scratch.join(&name);
        std::fs::create_dir_all(&local).unwrap();
        if let Some(cm) = s(volumes[&name], &["configMap", "name"]).and_then(|v| v.as_str()) {
            let data = config_maps
                .get(cm)
                .and_then(|c| c.get("data"))
                .and_then(|d| d.as_mapping())
                .unwrap_or_else(|| panic!("{}: ConfigMap {cm} has no data", dir.display()));
            for (k, v) in data {
                let file = local.join(k.as_str().unwrap());
                std::fs::write(&file, v.as_str().unwrap()).unwrap();
                files.push(file);
            }
        }
        mounts.push((path, local));
    }
    // Paths the files name inside the mounts (e.g. NSM_CONFIG's
    // networkServiceFile) lead to the scratch copies too.
    for file in &files {
        let mut text = std::fs::read_to_string(file).unwrap();
        for (path, local) in &mounts {
            text = text.replace(&format!("{path}/"), &format!("{}/", local.display()));
        }
        std::fs::write(file, text).unwrap();
    }
    let mut env = BTreeMap::new();
    for e in seq(container, &["env"]) {
        let name = str_of(e, &["name"]);
        let value = match s(e, &["valueFrom", "fieldRef", "fieldPath"]).and_then(|v| v.as_str()) {
            Some("metadata.name") => "pod-0".to_owned(),
            Some("spec.nodeName") => "node-0".to_owned(),
            Some(other) => format!("value-of-{other}"),
            None => expand(&str_of(e, &["value"]), &env),
        };
        // A file in a mounted volume: the scratch copy (sockets stay as
        // they are; only their syntax is checked).
        let value = mounts
            .iter()
            .find(|(p, _)| value.starts_with(p.as_str()) && !value.ends_with(".sock"))
            .map(|(p, local)| value.replacen(p.as_str(), local.to_str().unwrap(), 1))
            .unwrap_or(value);
        env.insert(name, value);
    }
    let mut cmd = Command::new(nsm_tests::process::bin(binary));
    for a in seq(container, &["args"]) {
        cmd.arg(a.as_str().unwrap());
    }
    cmd.arg("--check-config").env_clear().envs(&env);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}: container {} ({binary}) fails its config check (exit {:?}): {}{}\nenv: {env:?}",
        dir.display(),
        str_of(container, &["name"]),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    // Its exec probes, started here and judged by the caller (each waits
    // for the identity the manifest names, which no test has).
    let probes = ["startupProbe", "livenessProbe", "readinessProbe"]
        .into_iter()
        .filter_map(|p| s(container, &[p, "exec", "command"]).map(|c| (p, c)))
        .map(|(p, command)| {
            let argv: Vec<&str> = command
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(
                argv.first(),
                Some(&binary),
                "{}: {p} runs {argv:?}",
                dir.display()
            );
            let child = Command::new(nsm_tests::process::bin(binary))
                .args(&argv[1..])
                .env_clear()
                .envs(&env)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            Probe {
                what: format!("{}: {p} {argv:?}", dir.display()),
                child,
            }
        })
        .collect();
    (probes, scratch)
}

/// An exec probe of a rendered container, running.
struct Probe {
    what: String,
    child: std::process::Child,
}

impl Probe {
    /// With nothing serving, the probe must say so (exit 1, "not healthy"):
    /// not a usage error (2) or a configuration error (64).
    fn judge(self) {
        let out = self.child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains("not healthy"),
            "{}: exit {:?}: {err}",
            self.what,
            out.status.code()
        );
    }
}

#[test]
fn every_kustomization_renders_and_every_container_of_ours_starts() {
    let Some(tool) = nsm_tests::go_bin("kustomize-render", "tests/go/kustomize-render") else {
        return;
    };
    let dirs = kustomizations();
    assert!(dirs.len() >= 8, "bases, overlays and examples: {dirs:?}");
    let (mut checked, mut probes, mut scratches) = (0, Vec::new(), Vec::new());
    for dir in &dirs {
        let objects = render(&tool, dir);
        assert!(!objects.is_empty(), "{} renders nothing", dir.display());
        let config_maps: BTreeMap<String, serde_norway::Value> = objects
            .iter()
            .filter(|o| str_of(o, &["kind"]) == "ConfigMap")
            .map(|o| (str_of(o, &["metadata", "name"]), o.clone()))
            .collect();
        for o in &objects {
            let kind = str_of(o, &["kind"]);
            if !["Deployment", "DaemonSet"].contains(&kind.as_str()) {
                continue;
            }
            let pod = s(o, &["spec", "template", "spec"]).unwrap();
            // Every ConfigMap a volume names is in the same rendering
            // (dirs holding only a base of a larger install are exempt:
            // their ConfigMaps come with them).
            for v in seq(pod, &["volumes"]) {
                if let Some(cm) = s(v, &["configMap", "name"]).and_then(|v| v.as_str()) {
                    assert!(
                        config_maps.contains_key(cm),
                        "{}: {kind} mounts ConfigMap {cm}, which it does not install",
                        dir.display()
                    );
                }
            }
            for c in seq(pod, &["containers"]) {
                let image = str_of(c, &["image"]);
                let Some((_, binary)) = OURS.iter().find(|(p, _)| image.starts_with(p)) else {
                    continue;
                };
                assert!(
                    !image.ends_with(":latest")
                        && str_of(c, &["imagePullPolicy"]) == "IfNotPresent",
                    "{}: {image} must be pinned and IfNotPresent",
                    dir.display()
                );
                let (p, scratch) = check_container(dir, pod, c, &config_maps, binary);
                probes.extend(p);
                scratches.push(scratch);
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "containers of ours checked: {checked}");
    assert!(
        probes.len() >= 2 * checked,
        "two probes per container of ours"
    );
    probes.into_iter().for_each(Probe::judge);
    for d in scratches {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The config check is a real one: the manifest's endpoint without its
/// identity socket exits 64 and says why (the bug it once had: the variable
/// sat among the container's ports).
#[test]
fn the_config_check_fails_what_would_not_start() {
    let out = Command::new(nsm_tests::process::bin("mesh-proxy-nse"))
        .arg("--check-config")
        .env_clear()
        .env("NSM_NAME", "pod-0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity"));
}
