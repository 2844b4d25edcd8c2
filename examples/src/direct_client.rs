//! A minimal in-process NSM client for the setup benchmark: one Request or
//! Close over a fresh unix connection, with a client namespace's fd beside
//! it (grpcfd), exactly as nsc-init sends it — without nsc-init's process
//! start, so the figures show what the forwarder, the endpoint and the
//! kernel cost.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use forwarder_plugin::link::{LinkError, Links};
use forwarder_plugin::netns::Netns;
use nsm_api::connection::{Connection, PathSegment};
use nsm_api::mechanism::{self, keys};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::path;
use nsm_api::tls::{Identity, TlsError};
use nsm_api::token::{TokenError, TokenIssuer};
use nsm_api::transport::{CallError, Dialer, Target};
use tokio::time::Instant;

const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot pass the netns fd: {0}")]
    SendFd(#[source] std::io::Error),
    #[error("interface {0:?} is not in the client namespace after the Request")]
    NoInterface(String),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Requests and Closes on a hop's unix socket.
#[derive(Debug)]
pub struct DirectClient {
    dialer: Dialer,
    name: String,
    tokens: TokenIssuer,
}

impl DirectClient {
    /// A client with `identity`'s SVID (mTLS, tokens signed with its key),
    /// or without TLS (`None`: ephemeral tokens under `name`).
    pub fn new(
        socket: &Path,
        name: &str,
        lifetime: Duration,
        identity: Option<&Arc<Identity>>,
    ) -> Result<Self, DirectError> {
        Ok(DirectClient {
            dialer: Dialer::new(Target::Unix(socket.to_owned()), CALL_TIMEOUT)
                .with_tls(identity)?,
            name: name.to_owned(),
            tokens: TokenIssuer::for_identity(identity, name, lifetime)?,
        })
    }

    /// Puts us in segment 0 with a fresh token.
    fn stamp(&self, conn: &mut Connection) -> Result<(), DirectError> {
        let token = self.tokens.issue()?;
        let path = conn.path.get_or_insert_with(Default::default);
        path.index = 0;
        let ours = PathSegment {
            name: self.name.clone(),
            id: conn.id.clone(),
            token: token.jwt.clone(),
            expires: Some(path::to_timestamp(token.expires)),
            ..Default::default()
        };
        match path.path_segments.first_mut() {
            Some(seg) => {
                seg.token = ours.token;
                seg.expires = ours.expires;
            }
            None => path.path_segments.push(ours),
        }
        Ok(())
    }

    /// Requests `service` with a KERNEL interface `iface` in `netns`;
    /// `labels` go in `connection.labels` (as a URL's query would).
    pub async fn request(
        &self,
        netns: &Netns,
        id: &str,
        service: &str,
        iface: &str,
        labels: &[(&str, &str)],
    ) -> Result<Connection, DirectError> {
        let conn = Connection {
            id: id.to_owned(),
            network_service: service.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        };
        self.send(netns, conn, iface).await
    }

    /// Refreshes `conn` as the last Request returned it (as NSM's refresh
    /// client does), its interface still `iface` in `netns`.
    pub async fn refresh(
        &self,
        netns: &Netns,
        conn: &Connection,
        iface: &str,
    ) -> Result<Connection, DirectError> {
        self.send(netns, conn.clone(), iface).await
    }

    async fn send(
        &self,
        netns: &Netns,
        mut conn: Connection,
        iface: &str,
    ) -> Result<Connection, DirectError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let session = self.dialer.dial(deadline).await?;
        let url = session
            .fds()
            .expect("a unix connection has an fd channel")
            .send_fd(netns.as_fd())
            .map_err(DirectError::SendFd)?;
        let pref = mechanism::kernel([
            (keys::NAME.to_owned(), iface.to_owned()),
            (keys::INODE_URL.to_owned(), url.to_string()),
        ]);
        self.stamp(&mut conn)?;
        let msg = NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: vec![pref],
        };
        Ok(session.request(msg, &self.tokens, deadline).await?.conn)
    }

    /// Closes `conn` as the Request returned it.
    pub async fn close(&self, conn: &Connection) -> Result<(), DirectError> {
        let mut conn = conn.clone();
        self.stamp(&mut conn)?;
        Ok(self
            .dialer
            .close(conn, &self.tokens, Instant::now() + CALL_TIMEOUT)
            .await?)
    }
}

/// Checks that `iface` exists and is up in `links`' namespace (what
/// nsc-init waits for), over rtnetlink.
pub async fn interface_ready(links: &Links, iface: &str) -> Result<(), DirectError> {
    match links.link(iface).await? {
        Some(l) if l.up => Ok(()),
        _ => Err(DirectError::NoInterface(iface.to_owned())),
    }
}
