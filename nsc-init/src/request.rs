//! Requests and Closes, the way NSM's client chain does them: updatepath
//! (segment 0 = us, id `<name>-<i>`), the kernel mechanism preference with our
//! netns as an `inode://` URL whose fd travels on the same unix connection
//! (sendfd), token metadata, one fresh connection per attempt, and retry with
//! backoff until NSM_REQUEST_TIMEOUT.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nsm_api::connection::{Connection, Mechanism, Path, PathSegment};
use nsm_api::grpcfd;
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{LINUX_IF_MAX_LENGTH, MechanismExt, keys};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::nsurl::NsUrl;
use nsm_api::tls::Identity;
use nsm_api::token::{TokenError, TokenIssuer};
use nsm_api::transport::{CallError, Dialer, Session, Target};
use rand::Rng;
use tokio::time::Instant;
use tonic::Code;

use crate::config::{Config, ConnectTo};
use crate::exit::Failure;

/// Our own network namespace, opened once on the main thread before the
/// runtime starts (a runtime thread's `/proc/thread-self` would be its own,
/// and only the main thread's is certain to be the pod's).
pub struct OwnNetns {
    file: File,
    url: InodeUrl,
}

impl OwnNetns {
    pub const PATH: &'static str = "/proc/thread-self/ns/net";

    pub fn open() -> Result<OwnNetns, Failure> {
        let file = File::open(Self::PATH)
            .map_err(|e| Failure::Setup(format!("cannot open {}: {e}", Self::PATH)))?;
        let url = grpcfd::inode_url_of(file.as_fd())
            .map_err(|e| Failure::Setup(format!("cannot stat {}: {e}", Self::PATH)))?;
        Ok(OwnNetns { file, url })
    }

    pub fn url(&self) -> InodeUrl {
        self.url
    }
}

/// One entry of NSM_NETWORK_SERVICES and what we ask for it.
#[derive(Debug, Clone)]
pub struct Service {
    pub url: NsUrl,
    /// `<NSM_NAME>-<i>`: stable across restarts, so a re-run refreshes.
    pub id: String,
    /// Requested interface name: the URL's, or generated once per run.
    pub interface: String,
    pub labels: BTreeMap<String, String>,
}

impl Service {
    pub fn list(cfg: &Config) -> Vec<Service> {
        cfg.services
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let mut labels = cfg.labels.clone();
                labels.extend(url.labels.clone());
                Service {
                    id: format!("{}-{i}", cfg.name),
                    interface: url
                        .interface
                        .clone()
                        .unwrap_or_else(|| generate_interface_name(&url.network_service)),
                    url: url.clone(),
                    labels,
                }
            })
            .collect()
    }

    /// The mechanism preference: KERNEL with our interface name and netns.
    pub fn preference(&self, netns: InodeUrl) -> Mechanism {
        let mut m = self.url.mechanism();
        m.set_param(keys::NAME, self.interface.clone());
        m.set_param(keys::INODE_URL, netns.to_string());
        m
    }

    /// A first request's connection: id, service, labels; the path is
    /// filled per attempt (fresh token).
    pub fn new_connection(&self) -> Connection {
        Connection {
            id: self.id.clone(),
            network_service: self.url.network_service.clone(),
            labels: self.labels.clone().into_iter().collect(),
            ..Default::default()
        }
    }
}

/// `<service[:10]>-<random>`, 15 bytes, as NSM's kernel client names an
/// interface when the URL has none; characters a Linux name may not hold
/// become `-`.
pub fn generate_interface_name(service: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut name: String = service
        .chars()
        .map(|c| {
            if c == '/' || c == ':' || c.is_whitespace() || c.is_control() || !c.is_ascii() {
                '-'
            } else {
                c
            }
        })
        .take(10)
        .collect();
    name.push('-');
    let mut rng = rand::rng();
    while name.len() < LINUX_IF_MAX_LENGTH {
        name.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    name
}

/// Exponential backoff: 100ms, doubling, capped at 1s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("dial: {0}")]
    Dial(String),
    #[error("cannot pass our netns fd: {0}")]
    SendFd(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Our SVID cannot make a TLS client or sign a token.
    #[error("our identity: {0}")]
    Identity(String),
}

impl AttemptError {
    /// A failed call of the transport, with the attempt's `timeout`.
    fn from_call(e: CallError, timeout: Duration) -> AttemptError {
        match e {
            CallError::Dial { why, .. } => AttemptError::Dial(why),
            CallError::Deadline { .. } => AttemptError::Timeout(timeout),
            CallError::Status { status, .. } => AttemptError::Status(status),
            CallError::Token { why, .. } => AttemptError::Identity(why),
        }
    }

    /// Worth another attempt before the deadline? Connection-level failures
    /// and transient statuses are; a definite answer (bad request, unknown
    /// service, denied, no resources) is not. Unknown/Internal/Aborted are
    /// retried because Go hops report "no endpoint yet" and forwarder hiccups
    /// that way, and NSM's own client retries them too.
    pub fn retryable(&self) -> bool {
        match self {
            AttemptError::Dial(_) | AttemptError::SendFd(_) | AttemptError::Timeout(_) => true,
            AttemptError::Status(s) => matches!(
                s.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
                    | Code::Aborted
            ),
            AttemptError::Token(_) | AttemptError::Identity(_) => false,
        }
    }

    /// Did the manager never give a definite answer (exit 3 rather than 1)?
    pub fn no_answer(&self) -> bool {
        match self {
            AttemptError::Status(s) => matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ),
            AttemptError::Token(_) | AttemptError::Identity(_) => false,
            _ => true,
        }
    }
}

/// Talks to the manager on behalf of every service; cheap to clone into tasks.
#[derive(Clone)]
pub struct Client {
    pub cfg: Arc<Config>,
    pub tokens: Arc<TokenIssuer>,
    /// Our SVID for mTLS (`None`: insecure).
    pub tls: Option<Arc<Identity>>,
    pub netns: Arc<OwnNetns>,
}

impl Client {
    fn dialer(&self) -> Dialer {
        let target = match &self.cfg.connect_to {
            ConnectTo::Unix(path) => Target::Unix(path.clone()),
            ConnectTo::Tcp(addr) => Target::Tcp(addr.clone()),
        };
        Dialer::new(target, self.cfg.dial_timeout)
    }

    /// One fresh gRPC connection (and, over unix, its fd side channel).
    async fn dial(&self, timeout: Duration) -> Result<Session, AttemptError> {
        self.dialer()
            .with_tls(self.tls.as_ref())
            .map_err(|e| AttemptError::Identity(e.to_string()))?
            .dial(Instant::now() + timeout)
            .await
            .map_err(|e| AttemptError::from_call(e, timeout))
    }

    /// Puts us in segment 0 with a fresh token (nsmgr replaces it with the
    /// per-RPC token it received, whose `aud` names it).
    fn stamp(&self, conn: &mut Connection) -> Result<(), AttemptError> {
        let token = self.tokens.issue()?;
        let ours = PathSegment {
            name: self.cfg.name.clone(),
            id: conn.id.clone(),
            token: token.jwt.clone(),
            expires: Some(nsm_api::path::to_timestamp(token.expires)),
            ..Default::default()
        };
        let path = conn.path.get_or_insert_with(Path::default);
        path.index = 0;
        match path.path_segments.first_mut() {
            // Keep the metrics a previous answer left in our segment.
            Some(seg) => {
                seg.name = ours.name;
                seg.id = ours.id;
                seg.token = ours.token;
                seg.expires = ours.expires;
            }
            None => path.path_segments.push(ours),
        }
        Ok(())
    }

    /// One Request over one fresh connection.
    pub async fn request_once(
        &self,
        svc: &Service,
        conn: &Connection,
        timeout: Duration,
    ) -> Result<Connection, AttemptError> {
        let deadline = Instant::now() + timeout;
        let session = self.dial(timeout).await?;
        let mut pref = svc.preference(self.netns.url());
        if let Some(fds) = session.fds() {
            // Queued now, written with the Request's first bytes.
            let sent = fds
                .send_fd(self.netns.file.as_fd())
                .map_err(AttemptError::SendFd)?;
            pref.set_param(keys::INODE_URL, sent.to_string());
        }
        let mut conn = conn.clone();
        self.stamp(&mut conn)?;
        let msg = NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: vec![pref],
        };
        let server = session.server().cloned();
        let conn = session
            .request(msg, &self.tokens, deadline)
            .await
            .map(|answer| answer.conn)
            .map_err(|e| AttemptError::from_call(e, timeout))?;
        // sdk's authorize client: the returned path must keep NSM's
        // policies, else the connection is Closed and refused.
        if let (Some(server), Some(path)) = (&server, &conn.path) {
            let checked = nsm_api::authorize::check_client(
                &self.cfg.client_policies,
                path,
                server,
                std::time::SystemTime::now(),
            );
            if let Err(denied) = checked {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(e) = self.close(&conn, left.max(self.cfg.dial_timeout)).await {
                    tracing::warn!(id = %conn.id, error = %e, "cannot Close the connection whose path we refused");
                }
                return Err(AttemptError::Status(tonic::Status::permission_denied(
                    format!("the returned path: {denied}"),
                )));
            }
        }
        Ok(conn)
    }

    /// Requests `conn` for `svc`, retrying transient failures with backoff
    /// until `timeout` has passed.
    pub async fn request(
        &self,
        svc: &Service,
        conn: &Connection,
        timeout: Duration,
    ) -> Result<Connection, Failure> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut backoff = Backoff::new();
        // The last answer with a reason: what the user is told when the
        // final attempt only ran out of time.
        let mut answered: Option<tonic::Status> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut err = match self.request_once(svc, conn, left).await {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            match &err {
                AttemptError::Status(s) => answered = Some(s.clone()),
                AttemptError::Timeout(_) if answered.is_some() => {
                    err = AttemptError::Status(answered.clone().expect("checked"));
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !err.retryable() || left.is_zero() {
                return Err(self.failure(svc, err, start.elapsed()));
            }
            tracing::debug!(service = %svc.url, error = %err, "request failed, retrying");
            tokio::time::sleep(backoff.next_delay().min(left)).await;
            if deadline <= Instant::now() {
                return Err(self.failure(svc, err, start.elapsed()));
            }
        }
    }

    fn failure(&self, svc: &Service, err: AttemptError, waited: Duration) -> Failure {
        let url = svc.url.to_string();
        match err {
            e if e.no_answer() => Failure::Unreachable {
                url,
                connect_to: self.cfg.connect_to.to_string(),
                waited,
                reason: e.to_string(),
            },
            AttemptError::Status(s) => Failure::Refused {
                url,
                code: s.code(),
                message: s.message().to_owned(),
            },
            e => Failure::Setup(format!("{url}: {e}")),
        }
    }

    /// Close over a fresh connection; the fd is not needed (NSM's Close
    /// carries the connection as last returned).
    pub async fn close(&self, conn: &Connection, timeout: Duration) -> Result<(), AttemptError> {
        let session = self.dial(timeout).await?;
        let mut conn = conn.clone();
        self.stamp(&mut conn)?;
        session
            .close(conn, &self.tokens, Instant::now() + timeout)
            .await
            .map_err(|e| AttemptError::from_call(e, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_and_caps_at_1s() {
        let mut b = Backoff::new();
        let got: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn generated_names_are_linux_names_with_the_service_prefix() {
        for svc in [
            "mesh-proxy",
            "a",
            "autoscale-istio-proxy@my.cluster2",
            "x:y z",
        ] {
            let n = generate_interface_name(svc);
            assert_eq!(n.len(), LINUX_IF_MAX_LENGTH, "{n}");
            nsm_api::mechanism::validate_interface_name(&n).unwrap();
            let prefix: String = svc.chars().take(10).collect::<String>();
            let prefix = prefix.replace([':', ' '], "-");
            assert!(n.starts_with(&format!("{prefix}-")), "{n}");
        }
        assert_ne!(
            generate_interface_name("mesh-proxy"),
            generate_interface_name("mesh-proxy")
        );
    }

    #[test]
    fn which_failures_are_retried() {
        let st = |c| AttemptError::Status(tonic::Status::new(c, "x"));
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Internal,
        ] {
            assert!(st(c).retryable(), "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Unimplemented,
        ] {
            assert!(!st(c).retryable(), "{c:?}");
        }
        assert!(AttemptError::Dial("refused".into()).retryable());
        assert!(AttemptError::Timeout(Duration::from_secs(1)).retryable());
    }
}
