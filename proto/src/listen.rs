//! The unix socket an NSM hop serves on, and the signals that stop it: a stale
//! socket from a killed predecessor is replaced (anything else at the path is
//! refused), and the socket file is removed on exit unless someone else has
//! bound the path meanwhile.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot create the socket directory {0}: {1}")]
    SocketDir(PathBuf, #[source] std::io::Error),
    #[error("{0} exists and is not a unix socket: refusing to replace it")]
    NotASocket(PathBuf),
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

/// Binds `path` (creating its directory, replacing only a stale socket).
pub fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ListenError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ListenError::SocketDir(dir.to_owned(), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| ListenError::Stale(path.to_owned(), e))?
        }
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| ListenError::Bind(path.to_owned(), e))?;
    let id = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            id,
        },
    ))
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
        let (l, guard) = bind_unix(&sock).unwrap();
        drop(l);
        std::mem::forget(guard); // leave a stale socket, as a killed process would
        let (_l, guard) = bind_unix(&sock).unwrap();
        drop(guard);
        assert!(!sock.exists(), "socket file removed on drop");

        let file = dir.join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind_unix(&file), Err(ListenError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
