//! `--probe`: a process's own health check of a running server, for a
//! Kubernetes exec probe — what NSM's pods do with `grpc-health-probe
//! -spiffe`: dial the server's socket with this container's identity (mTLS
//! when it has one), ask `grpc.health.v1.Health` for the overall status and
//! for every NSM service, and succeed only if each is SERVING.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::tls::{Identity, Source, TlsError};
use crate::transport::{CallError, Dialer, Target};

/// How long a probe may take in all (Kubernetes' default probe timeout is 1 s;
/// manifests give ours more).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot reach {target}: {source}")]
    Dial { target: Target, source: CallError },
    #[error("health of {service:?}: {status}")]
    Call {
        service: String,
        status: tonic::Status,
    },
    #[error("{service:?} is {status:?}, not SERVING")]
    NotServing {
        service: String,
        status: ServingStatus,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Checks the server at `target` as its own container sees it.
pub async fn check(
    target: Target,
    identity: Option<&Arc<Identity>>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let dialer = Dialer::new(target.clone(), timeout).with_tls(identity)?;
    let run = async {
        let session = dialer
            .dial(Instant::now() + timeout)
            .await
            .map_err(|source| ProbeError::Dial { target, source })?;
        let mut client = HealthClient::new(session.channel());
        for service in std::iter::once("").chain(crate::HEALTH_SERVICE_NAMES) {
            let answer = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .map_err(|status| ProbeError::Call {
                    service: service.to_owned(),
                    status,
                })?;
            let status = answer.into_inner().status();
            if status != ServingStatus::Serving {
                return Err(ProbeError::NotServing {
                    service: service.to_owned(),
                    status,
                });
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

/// `--probe` for a binary's `main`: 0 when the server at `target` is
/// SERVING, 1 with the reason on stderr when not.
pub fn exit_code(program: &str, target: Target, identity: &Source) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let run = async {
        let identity = identity.open(PROBE_TIMEOUT).await?;
        check(target, identity.as_ref(), PROBE_TIMEOUT).await
    };
    match runtime.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: not healthy: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
