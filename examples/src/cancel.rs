//! Ctrl-C and SIGTERM for the orchestrator: the signal only sets a flag
//! that every wait checks, so the demo unwinds through its guards
//! (processes stopped, namespaces deleted) instead of dying with everything
//! left behind.

use std::sync::atomic::{AtomicBool, Ordering};

static CANCELLED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted (Ctrl-C or SIGTERM)")]
pub struct Cancelled;

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("cannot watch for Ctrl-C: {0}")]
    Install(#[source] std::io::Error),
}

/// Starts a thread that sets the flag on SIGINT or SIGTERM. The handlers are
/// in place when this returns; a second signal is ignored (the teardown
/// already runs).
pub fn install() -> Result<(), CancelError> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(CancelError::Install)?;
    let (mut int, mut term) = {
        let _g = rt.enter();
        (
            signal(SignalKind::interrupt()).map_err(CancelError::Install)?,
            signal(SignalKind::terminate()).map_err(CancelError::Install)?,
        )
    };
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if !CANCELLED.swap(true, Ordering::SeqCst) {
                    eprintln!("\ninterrupted: stopping the processes and deleting the namespaces");
                }
            }
        })
    });
    Ok(())
}

pub fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// `Err(Cancelled)` once a signal came.
pub fn check() -> Result<(), Cancelled> {
    if is_cancelled() {
        Err(Cancelled)
    } else {
        Ok(())
    }
}
