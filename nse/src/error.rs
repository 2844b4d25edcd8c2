//! The endpoint's error, and the ONE place errors become gRPC statuses.

use nsm_api::chain::ChainError;
use tonic::{Code, Status};

use crate::chain::functions::FunctionError;
use crate::ipam::IpamError;
use crate::mechanism::MechanismError;
use crate::validate::ValidateError;

#[derive(Debug, thiserror::Error)]
pub enum NseError {
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    /// NSM's generic elements (path, token, expiry, metadata): codes as NSM's.
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Mechanism(#[from] MechanismError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Function(#[from] FunctionError),
    /// A network service this endpoint does not provide (`NSM_SERVICE_NAMES`).
    #[error("network service {service:?} is not served by this endpoint (serves: {serves})")]
    UnknownService { service: String, serves: String },
    /// The caller's connection ended before our answer could go out on it.
    #[error(
        "the caller's connection ended before the answer (our netns fd cannot reach it: {0}); the new connection is rolled back"
    )]
    CallerGone(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl NseError {
    /// The gRPC code a caller gets for this error.
    pub fn code(&self) -> Code {
        match self {
            NseError::Chain(e) => e.code(),
            NseError::Invalid(_)
            | NseError::Mechanism(_)
            | NseError::Ipam(IpamError::Malformed { .. })
            | NseError::Function(FunctionError::Rejected { .. }) => Code::InvalidArgument,
            NseError::Ipam(IpamError::Exhausted { .. }) => Code::ResourceExhausted,
            NseError::Function(FunctionError::Precondition { .. }) => Code::FailedPrecondition,
            NseError::UnknownService { .. } => Code::NotFound,
            NseError::CallerGone(_) | NseError::Function(FunctionError::NotReady { .. }) => {
                Code::Unavailable
            }
            NseError::Function(FunctionError::Failed { .. }) | NseError::Internal(_) => {
                Code::Internal
            }
        }
    }
}

impl From<NseError> for Status {
    fn from(e: NseError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let exhausted = NseError::from(IpamError::Exhausted {
            prefixes: "198.18.0.0/31".into(),
        });
        let s = Status::from(exhausted);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("198.18.0.0/31"));
        let s = Status::from(NseError::from(MechanismError::NoneSupported {
            offered: "MEMIF".into(),
        }));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("cannot support any of the requested mechanisms: MEMIF")
        );
        let s = Status::from(NseError::from(ChainError::EmptyConnectionId));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "connection.id is empty")
        );
    }
}
