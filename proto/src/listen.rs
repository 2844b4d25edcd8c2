//! The unix socket an NSM hop serves on, and the signals that stop it.
//!
//! * The socket is `0660` (owner and group; the group can be chosen), in a
//!   directory that is not writable by others (one we create is `0750`): a
//!   caller needs to be let in, and nobody else can put a socket of their
//!   own in its place.
//! * A live socket at the path (another server answers on it) is an error;
//!   only a stale one, from a killed predecessor, is replaced; anything else
//!   at the path is refused.
//! * The socket file is removed on exit unless someone else has bound the
//!   path meanwhile.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot create the socket directory {0}: {1}")]
    SocketDir(PathBuf, #[source] std::io::Error),
    #[error("{0} exists and is not a unix socket: refusing to replace it")]
    NotASocket(PathBuf),
    #[error("another server is listening on unix://{0}: refusing to take its place")]
    Live(PathBuf),
    #[error(
        "the socket directory {0} is writable by others (mode {1:o}): anyone could put their own socket there; make it 0750 or 0770"
    )]
    OpenDir(PathBuf, u32),
    #[error("cannot set the mode or group of unix://{0}: {1}")]
    Permissions(PathBuf, #[source] std::io::Error),
    #[error("cannot remove the stale socket {0}: {1}")]
    Stale(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on unix://{0}: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("cannot install the {0} handler: {1}")]
    Signal(&'static str, #[source] std::io::Error),
}

/// Our socket file; dropping it removes the file if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Mode of our sockets: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a socket directory we create.
pub const DIR_MODE: u32 = 0o750;

/// Binds `path` (see the module doc): its directory created `0750` if
/// missing and refused if others may write to it, a stale socket replaced,
/// a live one refused; the socket made `0660` and, with `group`, given that
/// group.
pub fn bind_unix(
    path: &Path,
    group: Option<u32>,
) -> Result<(UnixListener, SocketFile), ListenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| ListenError::SocketDir(dir.to_owned(), e))?;
        let mode = std::fs::metadata(dir)
            .map_err(|e| ListenError::SocketDir(dir.to_owned(), e))?
            .permissions()
            .mode();
        if mode & 0o002 != 0 {
            return Err(ListenError::OpenDir(dir.to_owned(), mode & 0o7777));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::Live(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|e| ListenError::Stale(path.to_owned(), e))?
        }
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| ListenError::Bind(path.to_owned(), e))?;
    let file = SocketFile {
        path: path.to_owned(),
        id: std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino())),
    };
    let perms = |e| ListenError::Permissions(path.to_owned(), e);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(perms)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| perms(e.into()))?;
    }
    Ok((listener, file))
}

/// A group given by name or number, as `--socket-group` takes it.
pub fn parse_group(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if let Ok(gid) = t.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(t) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no group named {t:?}")),
        Err(e) => Err(format!("cannot look group {t:?} up: {e}")),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub fn termination() -> Result<impl Future<Output = ()> + Send + 'static, ListenError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| ListenError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ListenError::Signal("SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replaces_stale_sockets_refuses_files_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("nsm-listen-{}", std::process::id()));
        let sock = dir.join("sub/listen.sock");
        let (l, guard) = bind_unix(&sock, None).unwrap();
        drop(l);
        std::mem::forget(guard); // leave a stale socket, as a killed process would
        let (_l, guard) = bind_unix(&sock, None).unwrap();
        drop(guard);
        assert!(!sock.exists(), "socket file removed on drop");

        let file = dir.join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_unix(&file, None),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn sockets_are_0660_in_a_closed_directory_and_a_live_one_is_kept() {
        let dir = std::env::temp_dir().join(format!("nsm-listen-mode-{}", std::process::id()));
        let sock = dir.join("new/listen.sock");
        let (_l, _guard) = bind_unix(&sock, Some(nix::unistd::getgid().as_raw())).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&sock), SOCKET_MODE);
        assert_eq!(mode(sock.parent().unwrap()), DIR_MODE);
        // Someone answers there: refused, and the socket is still theirs.
        let e = bind_unix(&sock, None).unwrap_err();
        assert!(matches!(e, ListenError::Live(_)), "{e}");
        assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());

        let open = dir.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_unix(&open.join("x.sock"), None).unwrap_err();
        assert!(
            e.to_string().contains("writable by others (mode 777)"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(
            parse_group("no-such-group-here")
                .unwrap_err()
                .contains("no group")
        );
    }
}
