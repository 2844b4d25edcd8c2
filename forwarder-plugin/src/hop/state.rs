//! The hop's state file: `{"version": 1, "connections": {id: record}}` in
//! `<state dir>/state.json`, rewritten atomically (temp file, fsync,
//! rename, fsync of the directory) on every change, so a crash leaves the
//! old or the new document, never half of one. `<state dir>/state.lock` is
//! held (flock) while the file is in use: two hops on one directory would
//! overwrite each other's records.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::record::HopRecord;
use crate::rules::Owner;

/// The format version this build reads and writes.
pub const STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = "state.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is locked by another forwarder-plugin serve: give each one its own --state-dir"
    )]
    Locked { path: PathBuf },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a forwarder-plugin state file: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("{path} has state version {found}; this build reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDoc {
    pub version: u32,
    pub connections: BTreeMap<String, HopRecord>,
}

/// The open, locked state file and its current content.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    doc: Mutex<StateDoc>,
    _lock: Flock<File>,
}

impl StateFile {
    /// Creates `dir` (0700) if needed, takes its lock and reads the state
    /// (none yet: empty).
    pub fn open(dir: &Path) -> Result<StateFile, StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StateError::Io {
                op: "open",
                path: lock_path.clone(),
                source,
            })?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                match errno {
                    nix::errno::Errno::EWOULDBLOCK => StateError::Locked {
                        path: lock_path.clone(),
                    },
                    e => StateError::Io {
                        op: "lock",
                        path: lock_path.clone(),
                        source: e.into(),
                    },
                }
            })?;
        let path = dir.join(STATE_FILE);
        let doc = read(&path)?;
        Ok(StateFile {
            path,
            doc: Mutex::new(doc),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, StateDoc> {
        self.doc.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn records(&self) -> BTreeMap<String, HopRecord> {
        self.lock().connections.clone()
    }

    pub fn get(&self, id: &str) -> Option<HopRecord> {
        self.lock().connections.get(id).cloned()
    }

    /// Stores `record` for `id` and writes the file; on a write failure the
    /// content stays what it was.
    pub fn put(&self, id: &str, record: HopRecord) -> Result<(), StateError> {
        let mut doc = self.lock();
        let mut next = doc.clone();
        next.connections.insert(id.to_owned(), record);
        write(&self.path, &next)?;
        *doc = next;
        Ok(())
    }

    /// Forgets `id` and writes the file.
    pub fn remove(&self, id: &str) -> Result<Option<HopRecord>, StateError> {
        let mut doc = self.lock();
        if !doc.connections.contains_key(id) {
            return Ok(None);
        }
        let mut next = doc.clone();
        let old = next.connections.remove(id);
        write(&self.path, &next)?;
        *doc = next;
        Ok(old)
    }
}

fn read(path: &Path) -> Result<StateDoc, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(StateDoc {
                version: STATE_VERSION,
                connections: BTreeMap::new(),
            });
        }
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
    // The version first, so a newer format says so instead of failing on a field.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    if v.version != STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: v.version,
        });
    }
    let doc: StateDoc = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    for (id, rec) in &doc.connections {
        Owner::new(&rec.owner).map_err(|e| parse(format!("connection {id}: {e}")))?;
        rec.plan
            .validate()
            .map_err(|e| parse(format!("connection {id}: {e}")))?;
    }
    Ok(doc)
}

fn write(path: &Path, doc: &StateDoc) -> Result<(), StateError> {
    let io = |op, p: &Path| {
        let p = p.to_owned();
        move |source| StateError::Io {
            op,
            path: p,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_vec_pretty(doc).expect("the state always serialises");
    text.push(b'\n');
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(&text).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("replace", path))?;
        // The rename itself must reach the disk too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hop::record::Session;
    use crate::hop::redirect::BackendName;
    use crate::link::{VethEnd, VethPlan};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fp-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn record() -> HopRecord {
        let end = |ns: &str, name: &str| VethEnd {
            netns: ns.into(),
            name: name.into(),
            mac: None,
            addresses: vec![],
            routes: vec![],
            neighbours: vec![],
        };
        HopRecord {
            plan: VethPlan {
                a: end("inode://4/1", "nsm-1"),
                b: end("inode://4/2", "nse-1"),
                mtu: Some(1500),
                ipv6_nodad: true,
            },
            rules: Some(crate::rules::RedirectSpec::default()),
            backend: BackendName::Nft,
            owner: "fp_0123456789abc".into(),
            client_netns: "inode://4/1".into(),
            endpoint_netns: "inode://4/2".into(),
            session: Session {
                expires_unix: Some(1_900_000_000),
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trips_and_survives_reopen() {
        let d = dir("roundtrip");
        {
            let s = StateFile::open(&d).unwrap();
            assert!(s.records().is_empty());
            s.put("c1", record()).unwrap();
            s.put("c2", record()).unwrap();
            assert_eq!(s.remove("c2").unwrap(), Some(record()));
            assert_eq!(s.remove("c2").unwrap(), None);
        }
        let s = StateFile::open(&d).unwrap();
        assert_eq!(s.get("c1"), Some(record()));
        assert_eq!(s.records().len(), 1);
        let text = std::fs::read_to_string(d.join(STATE_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["connections"]["c1"]["backend"], "nft");
        assert_eq!(v["connections"]["c1"]["client_netns"], "inode://4/1");
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_user_of_the_directory_is_refused() {
        let d = dir("locked");
        let first = StateFile::open(&d).unwrap();
        let e = StateFile::open(&d).unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(first);
        StateFile::open(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unreadable_content_is_refused_not_overwritten() {
        let d = dir("bad");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(STATE_FILE), r#"{"version":2,"connections":{}}"#).unwrap();
        assert!(matches!(
            StateFile::open(&d),
            Err(StateError::Version { found: 2, .. })
        ));
        std::fs::write(d.join(STATE_FILE), "{").unwrap();
        assert!(matches!(StateFile::open(&d), Err(StateError::Parse { .. })));
        let mut doc = StateDoc {
            version: 1,
            connections: [("c".to_owned(), record())].into(),
        };
        doc.connections.get_mut("c").unwrap().owner = "Bad Owner".into();
        std::fs::write(d.join(STATE_FILE), serde_json::to_string(&doc).unwrap()).unwrap();
        let e = StateFile::open(&d).unwrap_err();
        assert!(e.to_string().contains("connection c"), "{e}");
        assert_eq!(
            std::fs::read_to_string(d.join(STATE_FILE)).unwrap(),
            serde_json::to_string(&doc).unwrap()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
