//! The hop's state on disk: ONE SMALL FILE PER CONNECTION,
//! `<state dir>/connections/<16 hex digits>.json`, so recording a change
//! costs the same with one connection or thousands, and connections never
//! wait for each other's writes. Loading is reading the directory.
//!
//! * A file is replaced atomically: a temp file in the same directory, then
//!   `rename`, so a crash of the process leaves the old or the new file,
//!   never half of one.
//! * No fsync. Everything a file describes (namespaces, veths, rules) dies
//!   with the kernel, so a record that survives a power loss describes
//!   nothing; files carry the boot id and those of an earlier boot are
//!   dropped at start. Against a crash of the process, which is what
//!   adoption is for, the page cache already holds every rename.
//! * `<state dir>/state.lock` is held (flock) while the directory is in use:
//!   two hops on one directory would undo each other's connections.
//! * A version 1 `<state dir>/state.json` (every connection in one file,
//!   rewritten on each change) is split into connection files at start.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::legacy_state;
use super::record::HopRecord;
use super::redirect::fnv1a64;
use crate::rules::Owner;

/// The format version of a connection file, which this build reads and writes.
pub const STATE_VERSION: u32 = 2;
/// The directory of connection files, inside the state directory.
pub const CONNECTIONS_DIR: &str = "connections";
pub const LOCK_FILE: &str = "state.lock";
/// Where boot ids come from: a record from another boot describes nothing.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

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
    #[error("{path} has state version {found}; this build reads version {reads}")]
    Version {
        path: PathBuf,
        found: u32,
        reads: u32,
    },
    #[error(
        "connection ids {id:?} and {other:?} hash to the same state file {file}: refusing to overwrite the other's record"
    )]
    Collision {
        id: String,
        other: String,
        file: String,
    },
}

/// One connection file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionFile {
    pub version: u32,
    /// The connection's id at this hop (our own path segment's id).
    pub id: String,
    /// `/proc/sys/kernel/random/boot_id` when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    pub record: HopRecord,
}

/// The locked state directory. Callers serialise changes per connection id
/// (the hop does); different ids may be written concurrently.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    connections: PathBuf,
    boot_id: Option<String>,
    /// File stem → the id whose record it holds (distinct ids may hash alike).
    files: Mutex<HashMap<String, String>>,
    /// Makes temp file names unique within this process.
    tmp_seq: AtomicU64,
    _lock: Flock<File>,
}

/// The file stem of connection `id`: 16 hex digits of a hash (ids may hold
/// any character, and may be long).
pub fn file_stem(id: &str) -> String {
    format!("{:016x}", fnv1a64(id.as_bytes()))
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io { op, path, source }
}

/// This boot's id (what tells a recorded pid or namespace of an earlier
/// boot from one of this boot).
pub(crate) fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl StateDir {
    /// Creates `dir` (0700) if needed, takes its lock, migrates a version 1
    /// `state.json`, and reads every connection file. Records written in an
    /// earlier boot are deleted, not returned.
    pub fn open(dir: &Path) -> Result<(StateDir, BTreeMap<String, HopRecord>), StateError> {
        let connections = dir.join(CONNECTIONS_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&connections)
            .map_err(|source| StateError::Dir {
                path: connections.clone(),
                source,
            })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
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
        let state = StateDir {
            dir: dir.to_owned(),
            connections,
            boot_id: boot_id(),
            files: Mutex::new(HashMap::new()),
            tmp_seq: AtomicU64::new(0),
            _lock: lock,
        };
        let mut records = state.read_all()?;
        let legacy = dir.join(legacy_state::LEGACY_FILE);
        if let Some(old) = legacy_state::read(&legacy)? {
            let n = old.len();
            for (id, rec) in old {
                if let std::collections::btree_map::Entry::Vacant(slot) = records.entry(id) {
                    state.put(slot.key(), &rec)?;
                    slot.insert(rec);
                }
            }
            // Only once every record has its own file: a crash before this
            // line migrates again at the next start.
            std::fs::remove_file(&legacy).map_err(io_err("remove", &legacy))?;
            tracing::info!(connections = n, from = %legacy.display(), "migrated the version 1 state file to one file per connection");
        }
        Ok((state, records))
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file holding connection `id`'s record.
    pub fn file_of(&self, id: &str) -> PathBuf {
        self.connections.join(format!("{}.json", file_stem(id)))
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `record` for `id` (replacing an earlier one). On failure the
    /// previous file, if any, is still there.
    pub fn put(&self, id: &str, record: &HopRecord) -> Result<(), StateError> {
        let stem = file_stem(id);
        if let Some(other) = self.files().get(&stem).filter(|o| *o != id) {
            return Err(StateError::Collision {
                id: id.to_owned(),
                other: other.clone(),
                file: format!("{stem}.json"),
            });
        }
        let doc = ConnectionFile {
            version: STATE_VERSION,
            id: id.to_owned(),
            boot_id: self.boot_id.clone(),
            record: record.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&doc).expect("a record always serialises");
        text.push(b'\n');
        let path = self.connections.join(format!("{stem}.json"));
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .connections
            .join(format!(".{stem}.{}.{seq}.tmp", std::process::id()));
        let written = (|| {
            let mut f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            f.write_all(&text).map_err(io_err("write", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err("replace", &path))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        self.files().insert(stem, id.to_owned());
        Ok(())
    }

    /// Forgets `id`'s record (nothing recorded: nothing to do).
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let stem = file_stem(id);
        if self.files().get(&stem).is_none_or(|o| o != id) {
            return Ok(());
        }
        let path = self.connections.join(format!("{stem}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        self.files().remove(&stem);
        Ok(())
    }

    /// Every connection file, checked; leftovers of an interrupted write and
    /// records of an earlier boot are deleted.
    fn read_all(&self) -> Result<BTreeMap<String, HopRecord>, StateError> {
        let dir = &self.connections;
        let entries = std::fs::read_dir(dir).map_err(io_err("read", dir))?;
        let mut records = BTreeMap::new();
        let mut earlier_boot = 0;
        for entry in entries {
            let entry = entry.map_err(io_err("read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                tracing::warn!(file = %path.display(), "ignoring a file that is not a connection record");
                continue;
            };
            let doc = read_file(&path).and_then(|doc| {
                if stem == file_stem(&doc.id) {
                    return Ok(doc);
                }
                Err(StateError::Parse {
                    path: path.clone(),
                    why: format!(
                        "it holds connection {:?}, whose file is {}.json",
                        doc.id,
                        file_stem(&doc.id)
                    ),
                })
            });
            let doc = match doc {
                Ok(doc) => doc,
                Err(e) => {
                    set_aside(&path, &e);
                    continue;
                }
            };
            if doc.boot_id.is_some() && self.boot_id.is_some() && doc.boot_id != self.boot_id {
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                earlier_boot += 1;
                continue;
            }
            self.files().insert(stem.to_owned(), doc.id.clone());
            records.insert(doc.id, doc.record);
        }
        if earlier_boot > 0 {
            tracing::info!(
                connections = earlier_boot,
                "dropped records written before the last reboot (their namespaces and veths are gone)"
            );
        }
        Ok(records)
    }
}

/// Moves a connection file this build cannot read out of the way
/// (`<name>.unreadable-<unix time>`, beside it): the hop starts without it,
/// and what it described — a veth, rules — is left for a person to look
/// at, which the warning says.
fn set_aside(path: &Path, why: &StateError) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".unreadable-{secs}"));
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(
            error = %why,
            moved_to = %Path::new(&aside).display(),
            "a connection record this build cannot read was set aside: what it describes (a veth, rules) is not undone by this hop"
        ),
        Err(e) => tracing::error!(
            error = %why,
            rename_error = %e,
            file = %path.display(),
            "a connection record this build cannot read could not be set aside either; ignoring it"
        ),
    }
}

/// Checks what a record must hold for cleanup to work.
pub(super) fn check_record(id: &str, rec: &HopRecord) -> Result<(), String> {
    Owner::new(&rec.owner).map_err(|e| format!("connection {id}: {e}"))?;
    rec.plan
        .validate()
        .map_err(|e| format!("connection {id}: {e}"))
}

/// The version first, so a newer format says so instead of failing on a field.
pub(super) fn check_version(path: &Path, text: &str, reads: u32) -> Result<(), StateError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_str(text).map_err(|e| StateError::Parse {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    if v.version != reads {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: v.version,
            reads,
        });
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<ConnectionFile, StateError> {
    let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
    let parse = |why: String| StateError::Parse {
        path: path.to_owned(),
        why,
    };
    check_version(path, &text, STATE_VERSION)?;
    let doc: ConnectionFile = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    check_record(&doc.id, &doc.record).map_err(parse)?;
    Ok(doc)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hop::record::Session;
    use crate::hop::redirect::BackendName;
    use crate::link::{VethEnd, VethPlan};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fp-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    pub(crate) fn record() -> HopRecord {
        let end = |ns: &str, name: &str| VethEnd {
            netns: ns.into(),
            name: name.into(),
            mac: None,
            addresses: vec![],
            routes: vec![],
            neighbours: vec![],
        };
        HopRecord {
            proxy: None,
            proxy_alt: false,
            labels: Default::default(),
            plan: VethPlan {
                a: end("inode://4/1", "nsm-1"),
                b: end("inode://4/2", "nse-1"),
                mtu: Some(1500),
                ipv6_nodad: true,
            },
            rules: Some(crate::rules::RedirectSpec::default()),
            capture: None,
            policies: vec![],
            slot: None,
            backend: BackendName::Nft,
            owner: "fp_0123456789abc".into(),
            client_netns: "inode://4/1".into(),
            endpoint_netns: "inode://4/2".into(),
            client_cookie: None,
            endpoint_cookie: None,
            session: Session {
                expires_unix: Some(1_900_000_000),
                caller_id: Some("client-0".into()),
                ..Default::default()
            },
        }
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.join(CONNECTIONS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn one_file_per_connection_survives_reopen() {
        let d = dir("roundtrip");
        {
            let (s, loaded) = StateDir::open(&d).unwrap();
            assert!(loaded.is_empty());
            s.put("c1", &record()).unwrap();
            s.put("c2", &record()).unwrap();
            let mut other = record();
            other.plan.a.name = "nsm-2".into();
            s.put("c2", &other).unwrap();
            assert_eq!(names(&d).len(), 2, "no temp files: {:?}", names(&d));
            s.remove("c2").unwrap();
            s.remove("c2").unwrap();
            s.remove("never").unwrap();
        }
        let (s, loaded) = StateDir::open(&d).unwrap();
        assert_eq!(loaded, [("c1".to_owned(), record())].into());
        assert_eq!(names(&d), [format!("{}.json", file_stem("c1"))]);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(s.file_of("c1")).unwrap()).unwrap();
        assert_eq!(v["version"], STATE_VERSION);
        assert_eq!(v["id"], "c1");
        assert_eq!(v["record"]["backend"], "nft");
        assert_eq!(v["record"]["client_netns"], "inode://4/1");
        assert_eq!(v["record"]["session"]["caller_id"], "client-0");
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_user_of_the_directory_is_refused() {
        let d = dir("locked");
        let first = StateDir::open(&d).unwrap();
        let e = StateDir::open(&d).unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(first);
        StateDir::open(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unreadable_files_are_set_aside_never_overwritten() {
        let d = dir("bad");
        let conns = d.join(CONNECTIONS_DIR);
        std::fs::create_dir_all(&conns).unwrap();
        let file = conns.join(format!("{}.json", file_stem("c")));
        let good = serde_json::to_value(ConnectionFile {
            version: STATE_VERSION,
            id: "c".into(),
            boot_id: None,
            record: record(),
        })
        .unwrap();
        let aside = || -> Vec<String> {
            std::fs::read_dir(&conns)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".unreadable-"))
                .collect()
        };
        let mut newer = good.clone();
        newer["version"] = 3.into();
        let mut bad_owner = good.clone();
        bad_owner["record"]["owner"] = "Bad Owner".into();
        let mut misfiled = good.clone();
        misfiled["id"] = "someone-else".into();
        for text in [
            newer.to_string(),
            "{".to_owned(),
            bad_owner.to_string(),
            misfiled.to_string(),
        ] {
            std::fs::write(&file, &text).unwrap();
            let (_s, loaded) =
                StateDir::open(&d).expect("an unreadable record does not stop the hop");
            assert!(loaded.is_empty(), "{text}");
            assert!(!file.exists(), "{text}: moved out of the way");
            let moved = aside();
            assert_eq!(moved.len(), 1, "{moved:?}");
            let kept = conns.join(&moved[0]);
            assert_eq!(
                std::fs::read_to_string(&kept).unwrap(),
                text,
                "kept as it was"
            );
            std::fs::remove_file(kept).unwrap();
        }

        std::fs::write(&file, good.to_string()).unwrap();
        let (_s, loaded) = StateDir::open(&d).unwrap();
        assert_eq!(loaded.len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn records_of_an_earlier_boot_and_temp_leftovers_are_dropped() {
        let Some(now) = boot_id() else {
            return; // no boot id to tell boots apart
        };
        let d = dir("boot");
        {
            let (s, _) = StateDir::open(&d).unwrap();
            s.put("this-boot", &record()).unwrap();
        }
        let conns = d.join(CONNECTIONS_DIR);
        let old = ConnectionFile {
            version: STATE_VERSION,
            id: "old".into(),
            boot_id: Some(format!("not-{now}")),
            record: record(),
        };
        std::fs::write(
            conns.join(format!("{}.json", file_stem("old"))),
            serde_json::to_string(&old).unwrap(),
        )
        .unwrap();
        std::fs::write(conns.join(".x.1.2.tmp"), "half").unwrap();
        let (_s, loaded) = StateDir::open(&d).unwrap();
        assert_eq!(loaded.keys().collect::<Vec<_>>(), ["this-boot"]);
        assert_eq!(names(&d), [format!("{}.json", file_stem("this-boot"))]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ids_that_share_a_file_are_refused() {
        let d = dir("collision");
        let (s, _) = StateDir::open(&d).unwrap();
        s.put("a", &record()).unwrap();
        // Pretend "b" hashed like "a" did.
        s.files().insert(file_stem("b"), "a".into());
        let e = s.put("b", &record()).unwrap_err();
        assert!(matches!(e, StateError::Collision { .. }), "{e}");
        // And removing "b" does not take "a"'s file.
        s.remove("b").unwrap();
        assert!(s.file_of("a").exists());
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
