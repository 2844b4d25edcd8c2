//! `NSM_CONFIG` read again while the endpoint runs: a mesh-proxy
//! instance's changed `proxy.process` (a new proxy version, a new
//! bootstrap) is upgraded to without dropping traffic; any other change
//! takes effect at the next start, and says so. A file that cannot be
//! read or is wrong keeps what is in force (logged).

use std::path::PathBuf;
use std::sync::Mutex;

use super::config::{FunctionsConfig, Kind};
use crate::mesh_proxy::process::ProcessConfig;

pub struct Reload {
    file: PathBuf,
    /// The running mesh-proxy instances' names.
    meshes: Vec<String>,
    /// What is in force (with the processes last asked for) and the text
    /// last read.
    seen: Mutex<(FunctionsConfig, Option<String>)>,
}

/// An instance's proxy definition to run instead of the one in force.
pub type Upgrade = (String, Option<ProcessConfig>);

fn process_of(config: &FunctionsConfig, name: &str) -> Option<ProcessConfig> {
    match config.functions.get(name) {
        Some(Kind::MeshProxy(c)) => c.proxy.process.clone(),
        _ => None,
    }
}

fn set_process(config: &mut FunctionsConfig, name: &str, p: Option<ProcessConfig>) {
    if let Some(Kind::MeshProxy(c)) = config.functions.get_mut(name) {
        c.proxy.process = p;
    }
}

impl Reload {
    /// Watches `file`, whose content `in_force` was read from.
    pub fn new(file: PathBuf, in_force: FunctionsConfig, meshes: Vec<String>) -> Reload {
        let text = super::policy::read(&file).ok();
        Reload {
            file,
            meshes,
            seen: Mutex::new((in_force, text)),
        }
    }

    /// Reads the file (bounded) and returns the instances whose process
    /// changed, with the new definition; blocking.
    pub fn changed(&self) -> Vec<Upgrade> {
        let text = match super::policy::read(&self.file) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read NSM_CONFIG again: the configuration in force stays");
                return Vec::new();
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.1.as_deref() == Some(text.as_str()) {
            return Vec::new();
        }
        seen.1 = Some(text.clone());
        let new = match FunctionsConfig::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(file = %self.file.display(), error = %e, "NSM_CONFIG is wrong: the configuration in force stays");
                return Vec::new();
            }
        };
        let mut upgrades = Vec::new();
        let mut rest = new.clone();
        for name in &self.meshes {
            let (now, next) = (process_of(&seen.0, name), process_of(&new, name));
            if now != next {
                tracing::info!(function = %name, "NSM_CONFIG: proxy.process changed");
                set_process(&mut seen.0, name, next.clone());
                upgrades.push((name.clone(), next));
            }
            set_process(&mut rest, name, process_of(&seen.0, name));
        }
        // The policy file is read again on its own (`Chains`).
        rest.policy = seen.0.policy.clone();
        if rest != seen.0 {
            tracing::warn!(file = %self.file.display(), "NSM_CONFIG changed beyond proxy.process: those changes take effect when the endpoint restarts");
        }
        upgrades
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(version: &str, dns: bool) -> String {
        format!(
            "version: 1\ncapture: {{dns: {dns}}}\nproxy:\n  process:\n    command: [haproxy]\n    env: {{VERSION: '{version}'}}\n"
        )
    }

    #[test]
    fn a_changed_process_is_an_upgrade_and_nothing_else_is() {
        let dir = std::env::temp_dir().join(format!("nse-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.yaml");
        std::fs::write(&file, config("1", false)).unwrap();
        let in_force = FunctionsConfig::load(&file).unwrap();
        let r = Reload::new(file.clone(), in_force, vec!["mesh-proxy".into()]);
        assert!(r.changed().is_empty(), "unchanged");

        std::fs::write(&file, config("2", false)).unwrap();
        let up = r.changed();
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].0, "mesh-proxy");
        let def = up[0].1.as_ref().expect("a definition");
        assert_eq!(def.env["VERSION"], "2");
        assert!(r.changed().is_empty(), "read once");

        // Another key: for the next start; a wrong file: nothing.
        std::fs::write(&file, config("2", true)).unwrap();
        assert!(r.changed().is_empty());
        std::fs::write(&file, "version: 1\nproxy: {port: nope}\n").unwrap();
        assert!(r.changed().is_empty());
        // Back to a definition in force: nothing to do.
        std::fs::write(&file, config("2", false)).unwrap();
        assert!(r.changed().is_empty());
        std::fs::write(&file, config("3", false)).unwrap();
        assert_eq!(r.changed().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
