//! Why nsc-init stopped, and the exit code each reason maps to (documented
//! in `--help` and README.md; scripts and kubelet events depend on them).

use std::process::ExitCode;

/// Exit codes.
pub mod code {
    pub const OK: u8 = 0;
    pub const REFUSED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const INTERFACE_TIMEOUT: u8 = 4;
    pub const VALIDATION: u8 = 5;
    pub const CONFIG: u8 = 64;
}

/// A failure that ends the run; `Display` is the one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The environment does not let us run at all (no /proc, no runtime).
    #[error("{0}")]
    Setup(String),
    #[error("{url}: refused by the manager: {code:?}: {message}")]
    Refused {
        url: String,
        code: tonic::Code,
        message: String,
    },
    /// The manager said yes, but with a connection we cannot use.
    #[error("{url}: unusable answer from the manager: {reason}")]
    BadAnswer { url: String, reason: String },
    #[error("{url}: manager {connect_to} unreachable for {waited:?}: {reason}")]
    Unreachable {
        url: String,
        connect_to: String,
        waited: std::time::Duration,
        reason: String,
    },
    #[error("{url}: {reason}")]
    InterfaceTimeout { url: String, reason: String },
    #[error("validate {probe}: {reason}")]
    Validation { probe: String, reason: String },
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::Config(_) | Failure::Setup(_) => code::CONFIG,
            Failure::Refused { .. } | Failure::BadAnswer { .. } => code::REFUSED,
            Failure::Unreachable { .. } => code::UNREACHABLE,
            Failure::InterfaceTimeout { .. } => code::INTERFACE_TIMEOUT,
            Failure::Validation { .. } => code::VALIDATION,
        }
    }

    /// Prints the one-line reason to stderr and returns the exit code.
    pub fn report(&self) -> ExitCode {
        let line = self.to_string().replace(['\n', '\r'], " ");
        eprintln!("nsc-init: {line}");
        ExitCode::from(self.code())
    }
}
