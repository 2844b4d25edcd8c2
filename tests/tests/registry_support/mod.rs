//! A fake NSM registry (nsmgr's registry side): NetworkServiceRegistry and
//! NetworkServiceEndpointRegistry on a unix socket with grpcfd, recording
//! what it is sent — and, for an endpoint's `inode://` URL, whether the fd
//! beside the call is that file and dials a listener through
//! `/proc/self/fd/<n>`, as nsmgr dials it.

#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nsm_api::inode::InodeUrl;
use nsm_api::registry::network_service_endpoint_registry_server::{
    NetworkServiceEndpointRegistry, NetworkServiceEndpointRegistryServer,
};
use nsm_api::registry::network_service_registry_server::{
    NetworkServiceRegistry, NetworkServiceRegistryServer,
};
use nsm_api::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse, NetworkServiceQuery, NetworkServiceResponse,
};
use nsm_api::transport::Peer;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub enum Seen {
    Service(NetworkService),
    Endpoint {
        nse: NetworkServiceEndpoint,
        /// The fd named by the inode URL: its inode and whether a unix
        /// connection through `/proc/self/fd/<n>` reached a listener.
        fd_inode: Option<InodeUrl>,
        dialable: bool,
        path_metadata: bool,
        token: bool,
        /// Under TLS: the caller's SPIFFE ID, and its token's `sub` and `aud`.
        peer: Option<String>,
        claims: Option<(String, Vec<String>)>,
    },
    Unregister(NetworkServiceEndpoint),
}

#[derive(Clone)]
struct FakeRegistry {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The expiration handed back to each registration.
    expiry: Duration,
}

fn md_ok(md: &tonic::metadata::MetadataMap) -> (bool, bool) {
    let path = md
        .get("path")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| {
            serde_json::from_str::<serde_json::Value>(s).is_ok_and(|v| v.get("Index").is_some())
        });
    let token =
        md.get("nsm-client-token").is_some() && md.get("nsm-client-token-expires").is_some();
    (path, token)
}

#[tonic::async_trait]
impl NetworkServiceRegistry for FakeRegistry {
    type FindStream = ReceiverStream<Result<NetworkServiceResponse, Status>>;

    async fn register(
        &self,
        req: Request<NetworkService>,
    ) -> Result<Response<NetworkService>, Status> {
        let ns = req.into_inner();
        self.seen.lock().unwrap().push(Seen::Service(ns.clone()));
        Ok(Response::new(ns))
    }

    async fn find(
        &self,
        _: Request<NetworkServiceQuery>,
    ) -> Result<Response<Self::FindStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn unregister(&self, _: Request<NetworkService>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl NetworkServiceEndpointRegistry for FakeRegistry {
    type FindStream = ReceiverStream<Result<NetworkServiceEndpointResponse, Status>>;

    async fn register(
        &self,
        req: Request<NetworkServiceEndpoint>,
    ) -> Result<Response<NetworkServiceEndpoint>, Status> {
        let (path_metadata, token) = md_ok(req.metadata());
        let claims = req
            .metadata()
            .get("nsm-client-token")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| nsm_api::authorize::decode(t).ok())
            .map(|c| (c.sub, c.aud));
        let caller = Peer::of(req.extensions());
        let peer = caller.svid.as_ref().map(|s| s.id.to_string());
        let fds = caller.fds;
        let mut nse = req.into_inner();
        let (mut fd_inode, mut dialable) = (None, false);
        if let (Ok(url), Some(fds)) = (nse.url.parse::<InodeUrl>(), fds)
            && let Ok(fd) = fds.recv_fd(&url, Duration::from_secs(2)).await
        {
            fd_inode = nsm_api::grpcfd::inode_url_of(std::os::fd::AsFd::as_fd(&fd)).ok();
            // What nsmgr does with it: dial through /proc.
            dialable = std::os::unix::net::UnixStream::connect(format!(
                "/proc/self/fd/{}",
                fd.as_raw_fd()
            ))
            .is_ok();
        }
        self.seen.lock().unwrap().push(Seen::Endpoint {
            nse: nse.clone(),
            fd_inode,
            dialable,
            path_metadata,
            token,
            peer,
            claims,
        });
        nse.expiration_time = Some(nsm_api::path::to_timestamp(SystemTime::now() + self.expiry));
        let mut resp = Response::new(nse);
        resp.metadata_mut().insert(
            "path",
            r#"{"Index":0,"PathSegments":[{"token":"a"},{"token":"b"}]}"#
                .parse()
                .unwrap(),
        );
        Ok(resp)
    }

    async fn find(
        &self,
        _: Request<NetworkServiceEndpointQuery>,
    ) -> Result<Response<Self::FindStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn unregister(
        &self,
        req: Request<NetworkServiceEndpoint>,
    ) -> Result<Response<()>, Status> {
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Unregister(req.into_inner()));
        Ok(Response::new(()))
    }
}

/// The fake on `socket`; stops on drop.
pub struct Running {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
    _socket: nsm_api::listen::SocketFile,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn start_registry(socket: &Path, expiry: Duration) -> Running {
    start_registry_with(socket, expiry, None)
}

/// [`start_registry`], over mTLS with `tls`'s SVID when given.
pub fn start_registry_with(
    socket: &Path,
    expiry: Duration,
    tls: Option<std::sync::Arc<nsm_api::tls::Identity>>,
) -> Running {
    let fake = FakeRegistry {
        seen: Arc::default(),
        expiry,
    };
    let (listener, file) = nsm_api::listen::bind_unix(socket, None).unwrap();
    let seen = fake.seen.clone();
    let task = tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            .add_service(NetworkServiceRegistryServer::new(fake.clone()))
            .add_service(NetworkServiceEndpointRegistryServer::new(fake));
        let incoming = nsm_api::grpcfd::incoming(listener);
        let _ = match tls {
            Some(id) => {
                let cfg = id.server_config().unwrap();
                router
                    .serve_with_incoming(nsm_api::transport::secure::secure_incoming(incoming, cfg))
                    .await
            }
            None => router.serve_with_incoming(incoming).await,
        };
    });
    Running {
        seen,
        task,
        _socket: file,
    }
}

impl Running {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn endpoints(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| matches!(s, Seen::Endpoint { .. }))
            .collect()
    }

    /// Waits until `pred` holds of what the registry saw.
    pub async fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&[Seen]) -> bool) {
        let end = Instant::now() + limit;
        while !pred(&self.seen()) {
            assert!(
                Instant::now() < end,
                "{what} within {limit:?}: saw {:#?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
