//! Version 1 of the hop's state: every connection in one
//! `<state dir>/state.json`, `{"version": 1, "connections": {id: record}}`,
//! rewritten (and fsync'd) on every change. Read once at start so a hop
//! upgraded in place still adopts what the old one plumbed; then
//! [`super::state::StateDir`] gives each connection its own file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::record::HopRecord;
use super::state::{StateError, check_record, check_version};

pub const LEGACY_FILE: &str = "state.json";
pub const LEGACY_VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyDoc {
    // Checked by `check_version`; listed so `deny_unknown_fields` accepts it.
    #[allow(dead_code)]
    version: u32,
    connections: BTreeMap<String, HopRecord>,
}

/// The connections of a version 1 state file; `None` if there is none.
/// Any other version is refused, and the file left as it is.
pub fn read(path: &Path) -> Result<Option<BTreeMap<String, HopRecord>>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                op: "read",
                path: path.to_owned(),
                source,
            });
        }
    };
    let parse = |why: String| StateError::Parse {
        path: path.to_owned(),
        why,
    };
    check_version(path, &text, LEGACY_VERSION)?;
    let doc: LegacyDoc = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    for (id, rec) in &doc.connections {
        check_record(id, rec).map_err(parse)?;
    }
    Ok(Some(doc.connections))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hop::state::{CONNECTIONS_DIR, StateDir, file_stem};

    fn record() -> HopRecord {
        serde_json::from_value(serde_json::json!({
            "plan": {
                "a": {"netns": "inode://4/1", "name": "nsm-1", "addresses": ["198.18.0.1/32"]},
                "b": {"netns": "inode://4/2", "name": "nse-1", "addresses": ["198.18.0.2/32"]},
                "mtu": 1500, "ipv6_nodad": true
            },
            "backend": "nft",
            "owner": "fp_0123456789abc",
            "client_netns": "inode://4/1",
            "endpoint_netns": "inode://4/2",
            "session": {"expires_unix": 1900000000}
        }))
        .unwrap()
    }

    #[test]
    fn a_version_1_file_is_split_into_connection_files() {
        let d = std::env::temp_dir().join(format!("fp-legacy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let doc = serde_json::json!({
            "version": 1,
            "connections": {"c1": record(), "c2": record()}
        });
        std::fs::write(d.join(LEGACY_FILE), doc.to_string()).unwrap();
        let (s, loaded) = StateDir::open(&d).unwrap();
        assert_eq!(
            loaded,
            [("c1".to_owned(), record()), ("c2".to_owned(), record())].into()
        );
        assert!(!d.join(LEGACY_FILE).exists(), "state.json is gone");
        assert!(s.file_of("c1").exists() && s.file_of("c2").exists());
        drop(s);
        // And the next start reads the connection files.
        let (_s, again) = StateDir::open(&d).unwrap();
        assert_eq!(again, loaded);
        assert!(
            d.join(CONNECTIONS_DIR)
                .join(format!("{}.json", file_stem("c2")))
                .exists()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_version_is_refused_and_left_alone() {
        let d = std::env::temp_dir().join(format!("fp-legacy-v-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let text = r#"{"version":7,"connections":{}}"#;
        std::fs::write(d.join(LEGACY_FILE), text).unwrap();
        let e = StateDir::open(&d).unwrap_err();
        assert!(
            matches!(
                e,
                StateError::Version {
                    found: 7,
                    reads: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(d.join(LEGACY_FILE)).unwrap(), text);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
