//! What the endpoint's table holds per connection (placement proxy), kept
//! on disk so that a restarted endpoint adopts it instead of deleting the
//! table: a control-plane crash must never let a client's traffic bypass the
//! proxy. One file per network namespace and table
//! (`<dir>/<table>-<netns inode>.json`), locked while an endpoint uses it,
//! replaced atomically (write, fsync, rename), versioned, and bound to the
//! namespace by its cookie (an inode number can come back for another
//! namespace; a cookie never does). Written before an interface joins the
//! set and after it leaves, so a crash in between leaves an entry too many
//! (still captured: fail closed), never one too few.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use forwarder_plugin::netns::Netns;
use serde::{Deserialize, Serialize};

use super::Live;

const VERSION: u32 = 1;
/// More than this is no file of ours: as many connections as one server takes.
const MAX_RECORDED: usize = nsm_api::limits::MAX_CONNECTIONS;
/// Nor is a file larger than this (each entry is well under 1 KiB).
const MAX_FILE: u64 = (MAX_RECORDED as u64) * 4096;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state {path} is in use by another endpoint in this network namespace (lock held)")]
    Locked { path: PathBuf },
    #[error("state directory {0} must not be writable by others")]
    Unsafe(PathBuf),
}

#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    version: u32,
    table: String,
    netns_cookie: u64,
    connections: BTreeMap<String, Live>,
}

/// The state file of one table in the calling thread's namespace.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    table: String,
    cookie: u64,
    /// flock'ed while we live.
    _lock: nix::fcntl::Flock<File>,
}

impl StateFile {
    /// Opens (and locks) the state of `table` in the caller's namespace under `dir`.
    pub fn open(dir: &Path, table: &str) -> Result<StateFile, StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io(dir))?;
        let md = std::fs::metadata(dir).map_err(io(dir))?;
        if md.permissions().mode() & 0o002 != 0 {
            return Err(StateError::Unsafe(dir.to_owned()));
        }
        let ino = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(io(Path::new("/proc/thread-self/ns/net")))?
            .ino();
        let cookie = Netns::current_cookie().map_err(io(Path::new("SO_NETNS_COOKIE")))?;
        let safe: String = table
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{safe}-{ino}.json"));
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o640)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StateError::Locked { path: path.clone() })
            .map(|locked| StateFile {
                path,
                table: table.to_owned(),
                cookie,
                _lock: locked,
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded connections. None recorded, or a file from another
    /// namespace (cookie), another table or another version: empty, with
    /// the reason (the file is then set aside, never silently reused).
    pub fn load(&self) -> Result<(BTreeMap<String, Live>, Option<String>), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut raw = Vec::new();
        match File::open(&self.path) {
            // Read no more than a file of ours can be.
            Ok(f) => f.take(MAX_FILE + 1).read_to_end(&mut raw).map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((BTreeMap::new(), None));
            }
            Err(e) => return Err(io(e)),
        };
        let why = match serde_json::from_slice::<Recorded>(&raw) {
            _ if raw.len() as u64 > MAX_FILE => format!("more than the {MAX_FILE} bytes of ours"),
            Err(e) => format!("unreadable: {e}"),
            Ok(r) if r.version != VERSION => format!("version {} (we write {VERSION})", r.version),
            Ok(r) if r.table != self.table => format!("table {} (ours: {})", r.table, self.table),
            Ok(r) if r.connections.len() > MAX_RECORDED => format!(
                "{} connections recorded, more than the {MAX_RECORDED} an endpoint holds",
                r.connections.len()
            ),
            Ok(r) if r.netns_cookie != self.cookie => {
                "another network namespace's (its cookie differs)".to_owned()
            }
            Ok(r) => return Ok((r.connections, None)),
        };
        let aside = self.path.with_extension(format!(
            "json.bad-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
        ));
        std::fs::rename(&self.path, &aside).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok((
            BTreeMap::new(),
            Some(format!("{why}; set aside as {}", aside.display())),
        ))
    }

    /// Records `live` (none: removes the file).
    pub fn save(&self, live: &BTreeMap<String, Live>) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        if live.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            };
        }
        let rec = Recorded {
            version: VERSION,
            table: self.table.clone(),
            netns_cookie: self.cookie,
            connections: live.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&rec).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(io)?;
        // Written aside and renamed: whole or not at all. Not synced: what
        // it records (links, rules) does not outlive a reboot either, and a
        // crash of the process keeps the page cache (an fsync cost ~0.7 ms
        // here, twice per Request and Close).
        f.write_all(&bytes).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(iface: &str) -> Live {
        Live {
            interface: iface.into(),
            ipv6: false,
            src: vec!["198.18.0.1/32".into()],
            dst: vec!["198.18.0.0/32".into()],
        }
    }

    #[test]
    fn records_round_trip_and_foreign_files_are_set_aside() {
        let dir = std::env::temp_dir().join(format!("nse-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = StateFile::open(&dir, "inet t").unwrap();
        assert_eq!(st.load().unwrap().0, BTreeMap::new());
        let conns = BTreeMap::from([
            ("a".to_owned(), live("mp-a")),
            ("b".to_owned(), live("mp-b")),
        ]);
        st.save(&conns).unwrap();
        assert_eq!(st.load().unwrap().0, conns);

        // A second user of the same namespace's file is refused.
        assert!(matches!(
            StateFile::open(&dir, "inet t"),
            Err(StateError::Locked { .. })
        ));

        // Another namespace's file (cookie) is not adopted: set aside.
        let mut raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(st.path()).unwrap()).unwrap();
        raw["netns_cookie"] = (st.cookie + 1).into();
        std::fs::write(st.path(), raw.to_string()).unwrap();
        let (got, why) = st.load().unwrap();
        assert!(got.is_empty());
        assert!(why.unwrap().contains("another network namespace"));
        assert!(!st.path().exists());

        st.save(&conns).unwrap();
        st.save(&BTreeMap::new()).unwrap();
        assert!(!st.path().exists(), "nothing live: no file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
