//! The endpoint's error, and the ONE place errors become gRPC statuses.

use tonic::{Code, Status};

use crate::chain::functions::FunctionError;
use crate::chain::timeout::TimeoutError;
use crate::chain::updatepath::PathError;
use crate::ipam::IpamError;
use crate::mechanism::MechanismError;
use crate::metadata::MetadataError;
use crate::token::TokenError;
use crate::validate::ValidateError;

#[derive(Debug, thiserror::Error)]
pub enum NseError {
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("connection.id is empty")]
    EmptyConnectionId,
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Timeout(#[from] TimeoutError),
    #[error(transparent)]
    Mechanism(#[from] MechanismError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Function(#[from] FunctionError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl NseError {
    /// The gRPC code a caller gets for this error.
    pub fn code(&self) -> Code {
        match self {
            NseError::Invalid(_)
            | NseError::Metadata(_)
            | NseError::EmptyConnectionId
            | NseError::Path(_)
            | NseError::Timeout(_)
            | NseError::Mechanism(_)
            | NseError::Ipam(IpamError::Malformed { .. })
            | NseError::Function(FunctionError::Rejected { .. }) => Code::InvalidArgument,
            NseError::Ipam(IpamError::Exhausted { .. }) => Code::ResourceExhausted,
            NseError::Function(FunctionError::Failed { .. })
            | NseError::Token(_)
            | NseError::Internal(_) => Code::Internal,
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
    }
}
