//! mTLS with SPIFFE X.509-SVIDs on the NSM transport every binary here
//! shares: over unix sockets (with fds passed beneath TLS, both ways) and
//! TCP; peers outside the trust domain, without a certificate or with an
//! expired one are refused; a rotated SVID is presented at the next
//! handshake; a silent client does not hold up the others. No root needed.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use examples::svid::TestCa;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::grpcfd::inode_url_of;
use nsm_api::inode::InodeUrl;
use nsm_api::monitor::MonitorHub;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_server::NetworkService;
use nsm_api::tls::Identity;
use nsm_api::token::TokenIssuer;
use nsm_api::transport::{CallError, Dialer, Listen, Peer, Target, serve};
use tonic::{Request, Response, Status};

const WAIT: Duration = Duration::from_secs(10);
const TRUST_DOMAIN: &str = "cluster.local";

/// Answers with who called (`peer` label), takes the fd the caller named in
/// its mechanism's `inodeURL` (`got` label: the inode it received) and sends
/// one of its own back (`sent` label).
struct WhoCalled {
    reply_file: PathBuf,
}

#[tonic::async_trait]
impl NetworkService for WhoCalled {
    async fn request(
        &self,
        req: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let peer = Peer::of(req.extensions());
        // The caller's per-RPC token: who signed it for whom.
        let claims = req
            .metadata()
            .get("nsm-client-token")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(t).ok())
            .map(|d| d.claims)
            .unwrap_or_default();
        let msg = req.into_inner();
        let mut conn = msg.connection.unwrap_or_default();
        conn.labels.insert(
            "peer".into(),
            peer.svid.map(|s| s.id.to_string()).unwrap_or_default(),
        );
        for claim in ["sub", "aud"] {
            conn.labels.insert(claim.into(), claims[claim].to_string());
        }
        let url = msg
            .mechanism_preferences
            .first()
            .and_then(|m| m.parameters.get("inodeURL"))
            .and_then(|u| u.parse::<InodeUrl>().ok());
        if let (Some(url), Some(fds)) = (url, &peer.fds) {
            let fd = fds
                .recv_fd(&url, WAIT)
                .await
                .map_err(|e| Status::failed_precondition(format!("no fd for {url}: {e}")))?;
            conn.labels
                .insert("got".into(), inode_url_of(fd.as_fd()).unwrap().to_string());
            let mine = std::fs::File::open(&self.reply_file).unwrap();
            let sent = fds.send_fd(mine.as_fd()).unwrap();
            conn.labels.insert("sent".into(), sent.to_string());
        }
        Ok(Response::new(conn))
    }

    async fn close(&self, _: Request<Connection>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(nsm_tests::unique("tls"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TLS (or plain) server on a unix socket or TCP port, stopped on drop.
struct Server {
    target: Target,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: Scratch,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(tls: Option<Arc<Identity>>, tcp: bool) -> Server {
    let dir = Scratch::new();
    let reply_file = dir.0.join("reply");
    std::fs::write(&reply_file, b"from the server").unwrap();
    let (listen, target) = if tcp {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        (Listen::Tcp(addr.parse().unwrap()), Target::Tcp(addr))
    } else {
        let sock = dir.0.join("s/nse.sock");
        (
            Listen::Unix {
                path: sock.clone(),
                group: None,
            },
            Target::Unix(sock),
        )
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = WhoCalled { reply_file };
    let l = listen.clone();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        if let Err(e) = serve(&l, tls, service, MonitorHub::new(), stopped).await {
            eprintln!("server failed: {e}");
        }
    });
    // Up when it answers (plain) or accepts (TLS).
    let deadline = Instant::now() + WAIT;
    loop {
        let up = match &target {
            Target::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Target::Tcp(a) => std::net::TcpStream::connect(a).is_ok(),
        };
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not start on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server {
        target,
        stop: Some(stop),
        _dir: dir,
    }
}

fn identity(ca: &TestCa, path: &str) -> Arc<Identity> {
    Identity::new(ca.material(&ca.issue(path).unwrap()).unwrap())
}

fn dialer(server: &Server, tls: Option<&Arc<Identity>>) -> (Dialer, TokenIssuer) {
    let d = Dialer::new(server.target.clone(), Duration::from_secs(3))
        .with_tls(tls)
        .unwrap();
    (
        d,
        TokenIssuer::for_identity(tls, "insecure-client", Duration::from_secs(60)).unwrap(),
    )
}

fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: "conn-1".into(),
            network_service: "mesh-proxy".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn call((d, tokens): &(Dialer, TokenIssuer)) -> Result<Connection, CallError> {
    d.request(request(), tokens, Instant::now() + WAIT)
        .await
        .map(|a| a.conn)
}

#[tokio::test]
async fn mtls_over_unix_names_the_caller_and_passes_fds_both_ways() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let server = start(Some(identity(&ca, "/ns/nsm/sa/nse")), false).await;
    let client = identity(&ca, "/ns/nsm/sa/forwarder");
    let scratch = Scratch::new();
    let mine = scratch.0.join("mine");
    std::fs::write(&mine, b"from the client").unwrap();
    let file = std::fs::File::open(&mine).unwrap();

    let (d, tokens) = dialer(&server, Some(&client));
    let session = d.dial(Instant::now() + WAIT).await.expect("mTLS dial");
    let url = session.fds().unwrap().send_fd(file.as_fd()).unwrap();
    let mut req = request();
    req.mechanism_preferences = vec![Mechanism {
        cls: "LOCAL".into(),
        r#type: "KERNEL".into(),
        parameters: [("inodeURL".to_string(), url.to_string())].into(),
    }];
    let answer = session
        .request(req, &tokens, Instant::now() + WAIT)
        .await
        .expect("request over mTLS");

    assert_eq!(
        answer.conn.labels["peer"], "spiffe://cluster.local/ns/nsm/sa/forwarder",
        "the server must know the caller by its SVID"
    );
    assert_eq!(
        (
            answer.conn.labels["sub"].as_str(),
            answer.conn.labels["aud"].as_str()
        ),
        (
            "\"spiffe://cluster.local/ns/nsm/sa/forwarder\"",
            "[\"spiffe://cluster.local/ns/nsm/sa/nse\"]"
        ),
        "the per-RPC token is the caller's, for this server"
    );
    assert_eq!(
        answer.conn.labels["got"],
        url.to_string(),
        "the fd sent beneath TLS must arrive as the same file"
    );
    let sent: InodeUrl = answer.conn.labels["sent"].parse().unwrap();
    let back = answer
        .fds
        .as_ref()
        .unwrap()
        .recv_fd(&sent, WAIT)
        .await
        .expect("the server's fd must arrive beneath TLS");
    assert_eq!(
        std::io::read_to_string(std::fs::File::from(back)).unwrap(),
        "from the server",
        "the fd the server sent must be its file"
    );
}

#[tokio::test]
async fn mtls_over_tcp_names_the_caller() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let server = start(Some(identity(&ca, "/ns/nsm/sa/nse")), true).await;
    let client = identity(&ca, "/ns/nsm/sa/nsmgr");
    let conn = call(&dialer(&server, Some(&client)))
        .await
        .expect("mTLS over TCP");
    assert_eq!(
        conn.labels["peer"],
        "spiffe://cluster.local/ns/nsm/sa/nsmgr"
    );
}

#[tokio::test]
async fn a_plaintext_client_is_refused_by_a_tls_server() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    for tcp in [false, true] {
        let server = start(Some(identity(&ca, "/nse")), tcp).await;
        let err = call(&dialer(&server, None))
            .await
            .expect_err("a plaintext caller must not get an answer from a TLS server");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }
}

#[tokio::test]
async fn a_tls_client_does_not_talk_to_a_plaintext_server() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let server = start(None, false).await;
    let err = call(&dialer(&server, Some(&identity(&ca, "/nsc"))))
        .await
        .expect_err("a TLS caller must not fall back to plaintext");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
}

/// The server's word on a TLS client that presents `cert` (or none) and
/// believes any server: `Ok` when it answers HTTP/2 after the handshake,
/// else the error (TLS 1.3 clients learn of a refused certificate on their
/// first read).
async fn raw_client(
    path: &std::path::Path,
    cert: Option<&examples::svid::Svid>,
) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let provider = nsm_api::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(BelieveAnyServer(provider)));
    let mut config = match cert {
        Some(svid) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(svid.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let io = tokio::net::UnixStream::connect(path).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), io)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("closed without a word".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// A server verifier that checks signatures only: the test's stand-in for a
/// caller that trusts anyone, so the server's own checks are what is tested.
#[derive(Debug)]
struct BelieveAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for BelieveAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An identity of `ca`'s trust domain that also trusts `extra`'s CA.
fn trusting_also(ca: &TestCa, extra: &TestCa, path: &str) -> Arc<Identity> {
    let svid = ca.issue(path).unwrap();
    let both = format!("{}{}", ca.bundle_pem(), extra.bundle_pem());
    Identity::new(
        nsm_api::tls::Material::from_pem(
            svid.cert_pem.as_bytes(),
            svid.key_pem.as_bytes(),
            both.as_bytes(),
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn the_server_refuses_callers_outside_its_trust_domain() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let other = TestCa::new("evil.example").unwrap();
    // It trusts the other CA's root too: only the trust domain check stands
    // between that CA's SVIDs and its API.
    let server = start(Some(trusting_also(&ca, &other, "/nse")), false).await;
    let Target::Unix(path) = &server.target else {
        unreachable!()
    };
    raw_client(path, Some(&ca.issue("/nsc").unwrap()))
        .await
        .expect("control: an SVID of the trust domain is served");

    let err = raw_client(path, None)
        .await
        .expect_err("a caller without a certificate must be refused");
    assert!(err.contains("CertificateRequired"), "{err}");
    let stranger = TestCa::new(TRUST_DOMAIN).unwrap();
    let err = raw_client(path, Some(&stranger.issue("/nsc").unwrap()))
        .await
        .expect_err("a certificate from an unknown CA must be refused");
    // A CA named as ours: its signature does not verify (DecryptError).
    assert!(err.contains("fatal alert"), "{err}");
    let err = raw_client(path, Some(&other.issue("/nsc").unwrap()))
        .await
        .expect_err("an SVID of another trust domain must be refused");
    assert!(err.contains("alert"), "{err}");
}

#[tokio::test]
async fn a_server_outside_the_trust_domain_is_refused() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let other = TestCa::new("evil.example").unwrap();
    let server = start(Some(identity(&other, "/nse")), false).await;
    let err = call(&dialer(&server, Some(&identity(&ca, "/nsc"))))
        .await
        .expect_err("a server certified by an unknown CA must be refused");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // A CA we trust, certifying a server of another trust domain.
    let client = trusting_also(&ca, &other, "/nsc");
    let err = call(&dialer(&server, Some(&client)))
        .await
        .expect_err("a server of another trust domain must be refused");
    assert!(
        err.to_string()
            .contains("spiffe://evil.example/nse is not of trust domain cluster.local"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_svids_are_refused_on_both_sides() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let expired = Identity::new(ca.material(&ca.issue_expired("/old").unwrap()).unwrap());

    let server = start(Some(identity(&ca, "/nse")), false).await;
    let Target::Unix(path) = &server.target else {
        unreachable!()
    };
    let err = raw_client(path, Some(&ca.issue_expired("/old").unwrap()))
        .await
        .expect_err("the server must refuse an expired client SVID");
    assert!(err.contains("CertificateExpired"), "{err}");
    // Our own client does not even sign a token with it.
    let err = call(&dialer(&server, Some(&expired)))
        .await
        .expect_err("an expired SVID must not make calls");
    assert!(err.to_string().contains("our SVID expired"), "{err}");

    let stale = start(Some(expired.clone()), false).await;
    let err = call(&dialer(&stale, Some(&identity(&ca, "/nsc"))))
        .await
        .expect_err("an expired server SVID must be refused");
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn a_rotated_svid_is_presented_at_the_next_handshake() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let server = start(Some(identity(&ca, "/nse")), false).await;
    let client = identity(&ca, "/nsc/first");
    let d = dialer(&server, Some(&client));
    assert_eq!(
        call(&d).await.unwrap().labels["peer"],
        "spiffe://cluster.local/nsc/first"
    );
    client.set(ca.material(&ca.issue("/nsc/second").unwrap()).unwrap());
    assert_eq!(
        call(&d).await.unwrap().labels["peer"],
        "spiffe://cluster.local/nsc/second",
        "the same dialer must present the rotated SVID"
    );
}

/// SVID files rewritten (as SPIRE's helper rotates them) are reloaded
/// without a restart: new connections get the new SVID, and a connection
/// opened before goes on working.
#[tokio::test]
async fn rotated_svid_files_are_reloaded_and_open_connections_survive() {
    use nsm_api::networkservice::network_service_client::NetworkServiceClient;

    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let dir = Scratch::new();
    let files = ca.write(&ca.issue("/nse/v1").unwrap(), &dir.0).unwrap();
    let served = Identity::from_files(files, Duration::from_millis(100)).unwrap();
    let server = start(Some(served), false).await;
    let client = identity(&ca, "/nsc");
    let (d, tokens) = dialer(&server, Some(&client));

    let before = d.dial(Instant::now() + WAIT).await.unwrap();
    assert_eq!(
        before.server().unwrap().id.to_string(),
        "spiffe://cluster.local/nse/v1"
    );
    let mut open = NetworkServiceClient::new(before.channel());
    let call = |tokens: &TokenIssuer| {
        let mut req = tonic::Request::new(request());
        nsm_api::metadata::insert_token(req.metadata_mut(), &tokens.issue().unwrap());
        req
    };
    open.request(call(&tokens)).await.expect("before rotation");

    ca.write(&ca.issue("/nse/v2").unwrap(), &dir.0).unwrap();
    let end = std::time::Instant::now() + WAIT;
    loop {
        let now = d.dial(Instant::now() + WAIT).await.unwrap();
        if now.server().unwrap().id.to_string() == "spiffe://cluster.local/nse/v2" {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the new SVID was not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open.request(call(&tokens))
        .await
        .expect("the connection opened before the rotation still works");
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_the_handshakes_of_others() {
    let ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let server = start(Some(identity(&ca, "/nse")), false).await;
    let Target::Unix(path) = &server.target else {
        unreachable!()
    };
    // Connected, never says a word.
    let _silent: Vec<_> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(path).unwrap())
        .collect();
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        call(&dialer(&server, Some(&identity(&ca, "/nsc")))),
    )
    .await
    .expect("a silent client must not hold up another's handshake")
    .unwrap();
    assert_eq!(conn.labels["peer"], "spiffe://cluster.local/nsc");
}
