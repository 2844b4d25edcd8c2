//! NSM's authorization policies on the wire: an endpoint served over mTLS
//! (in-process, the real chain) and callers with SVIDs of the trust domain
//! sending paths that break one policy each. Every denial is
//! `PermissionDenied` naming the policy; a path that keeps them all is
//! served; a connection is refreshed or closed only by the client that made
//! it. No root needed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use examples::svid::TestCa;
use nse::endpoint::{Endpoint, EndpointOptions};
use nse::ipam::Policy as IpamPolicy;
use nsm_api::authorize::Policies;
use nsm_api::connection::{Connection, Path, PathSegment};
use nsm_api::mechanism;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::tls::{Identity, PeerSvid, spiffe_id_of};
use nsm_api::token::TokenIssuer;
use nsm_api::transport::{CallError, Dialer, Target};
use tokio::time::Instant;

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);
const LIFETIME: Duration = Duration::from_secs(600);

struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The endpoint (SVID `/nse`) on a unix socket; stops on drop.
struct Served {
    socket: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: Scratch,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve(ca: &TestCa, policies: Policies) -> Served {
    let dir = Scratch(std::env::temp_dir().join(nsm_tests::unique("authz")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let socket = dir.0.join("s/nse.sock");
    let identity = identity(ca, "/nse");
    let endpoint = Arc::new(
        Endpoint::new(&EndpointOptions {
            name: "nse".into(),
            service_names: vec!["mesh-proxy".into()],
            cidr_groups: vec![vec!["198.18.0.0/24".parse().unwrap()]],
            ipam_policy: IpamPolicy::Polite,
            max_token_lifetime: LIFETIME,
            identity: Some(identity.clone()),
            policies,
        })
        .unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listen = nse::config::ListenOn::Unix(socket.clone());
    tokio::spawn(async move {
        let _ = nse::server::serve(&listen, None, Some(identity), endpoint, async move {
            let _ = stopped.await;
        })
        .await;
    });
    let deadline = std::time::Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "endpoint did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Served {
        socket,
        stop: Some(stop),
        _dir: dir,
    }
}

fn identity(ca: &TestCa, path: &str) -> Arc<Identity> {
    Identity::new(ca.material(&ca.issue(path).unwrap()).unwrap())
}

fn peer_of(identity: &Arc<Identity>) -> PeerSvid {
    let m = identity.current();
    PeerSvid {
        id: spiffe_id_of(&m.leaf).unwrap(),
        not_after: m.not_after,
        leaf: m.leaf.clone(),
    }
}

/// The forwarder's call: TLS as `tls`, the per-RPC token signed by `signer`.
struct Caller {
    dialer: Dialer,
    tokens: TokenIssuer,
}

impl Caller {
    fn new(served: &Served, tls: &Arc<Identity>, signer: &Arc<Identity>) -> Caller {
        Caller {
            dialer: Dialer::new(Target::Unix(served.socket.clone()), WAIT)
                .with_tls(Some(tls))
                .unwrap(),
            tokens: TokenIssuer::svid(signer.clone(), LIFETIME),
        }
    }

    async fn request(&self, conn: Connection) -> Result<Connection, CallError> {
        let req = NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: vec![mechanism::kernel([])],
        };
        self.dialer
            .request(req, &self.tokens, Instant::now() + WAIT)
            .await
            .map(|a| a.conn)
    }

    async fn close(&self, conn: Connection) -> Result<(), CallError> {
        self.dialer
            .close(conn, &self.tokens, Instant::now() + WAIT)
            .await
    }
}

/// A JWT with these claims and a signature no one checks (segment 0 is
/// checked for shape, chaining and expiry only).
fn unsigned_jwt(sub: &str, aud: &str, exp: u64) -> String {
    use base64::Engine;
    let b = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.{}",
        b(serde_json::json!({"alg": "ES256", "typ": "JWT"})),
        b(serde_json::json!({"sub": sub, "aud": [aud], "exp": exp})),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0u8; 64])
    )
}

fn in_secs(d: i64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (now + d) as u64
}

/// `[client, forwarder]` at index 1, the client's token as given.
fn conn(id: &str, client_token: String) -> Connection {
    let seg = |name: &str, token: String| PathSegment {
        name: name.into(),
        id: format!("{id}-{name}"),
        token,
        expires: Some(nsm_api::path::to_timestamp(
            SystemTime::now() + Duration::from_secs(60),
        )),
        ..Default::default()
    };
    Connection {
        id: format!("{id}-fwd"),
        network_service: "mesh-proxy".into(),
        path: Some(Path {
            index: 1,
            path_segments: vec![seg("nsc", client_token), seg("fwd", String::new())],
        }),
        ..Default::default()
    }
}

/// The client's segment-0 token, as nsmgr would forward it: signed by the
/// client for the forwarder.
fn client_token(client: &Arc<Identity>, fwd: &Arc<Identity>) -> String {
    TokenIssuer::svid(client.clone(), LIFETIME)
        .issue_for(Some(&peer_of(fwd)))
        .unwrap()
        .jwt
}

fn denied(res: Result<Connection, CallError>, policy: &str) {
    match res {
        Err(e @ CallError::Status { .. }) => {
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
            assert!(e.to_string().contains(policy), "want {policy}: {e}");
        }
        Err(e) => panic!("want PermissionDenied ({policy}), got {e}"),
        Ok(c) => panic!(
            "want PermissionDenied ({policy}), got a connection {}",
            c.id
        ),
    }
}

#[tokio::test]
async fn a_path_that_keeps_every_policy_is_served() {
    let ca = TestCa::new(TD).unwrap();
    let served = serve(&ca, Policies::server_default()).await;
    let (client, fwd) = (identity(&ca, "/nsc"), identity(&ca, "/fwd"));
    let caller = Caller::new(&served, &fwd, &fwd);
    let got = caller
        .request(conn("ok", client_token(&client, &fwd)))
        .await
        .expect("a well-formed chain must be served");
    caller.close(got).await.expect("and closed by its maker");
}

#[tokio::test]
async fn each_broken_policy_is_permission_denied() {
    let ca = TestCa::new(TD).unwrap();
    let served = serve(&ca, Policies::server_default()).await;
    let (client, fwd, other) = (
        identity(&ca, "/nsc"),
        identity(&ca, "/fwd"),
        identity(&ca, "/other"),
    );
    let caller = Caller::new(&served, &fwd, &fwd);
    let fwd_id = format!("spiffe://{TD}/fwd");

    // tokens_valid: segment 0 holds no JWT.
    denied(
        caller.request(conn("valid", "not-a-jwt".into())).await,
        "tokens_valid",
    );
    // tokens_chained, wrong audience: the client's token is for another hop.
    denied(
        caller
            .request(conn("aud", client_token(&client, &other)))
            .await,
        "tokens_chained",
    );
    // tokens_chained, broken chain: a hop between client and forwarder that
    // no token names.
    let mut broken = conn(
        "chain",
        unsigned_jwt(
            "spiffe://cluster.local/nsc",
            "spiffe://cluster.local/x",
            in_secs(600),
        ),
    );
    broken.path.as_mut().unwrap().path_segments.insert(
        1,
        PathSegment {
            name: "x".into(),
            id: "x".into(),
            token: unsigned_jwt("spiffe://cluster.local/y", &fwd_id, in_secs(600)),
            ..Default::default()
        },
    );
    broken.path.as_mut().unwrap().index = 2;
    denied(caller.request(broken).await, "tokens_chained");
    // tokens_expired: the client's token expired a minute ago.
    denied(
        caller
            .request(conn(
                "exp",
                unsigned_jwt(&format!("spiffe://{TD}/nsc"), &fwd_id, in_secs(-60)),
            ))
            .await,
        "tokens_expired",
    );
    // prev_token_signed: the caller proves /fwd over TLS but its token is
    // signed by another key of the trust domain.
    let forger = Caller::new(&served, &fwd, &other);
    denied(
        forger
            .request(conn("sig", client_token(&client, &fwd)))
            .await,
        "tokens_chained",
    );
    // … with `sub` /fwd and the right audience, yet not fwd's key.
    let impostor = Identity::new(
        TestCa::new(TD)
            .unwrap()
            .material(&ca.issue("/fwd").unwrap())
            .unwrap(),
    );
    let forger = Caller::new(&served, &fwd, &impostor);
    denied(
        forger
            .request(conn("sig2", client_token(&client, &fwd)))
            .await,
        "prev_token_signed",
    );
}

#[tokio::test]
async fn only_the_client_that_made_a_connection_refreshes_or_closes_it() {
    let ca = TestCa::new(TD).unwrap();
    let served = serve(&ca, Policies::server_default()).await;
    let (alice, mallory, fwd) = (
        identity(&ca, "/ns/a/pod/alice"),
        identity(&ca, "/ns/m/pod/mallory"),
        identity(&ca, "/fwd"),
    );
    let caller = Caller::new(&served, &fwd, &fwd);
    let made = caller
        .request(conn("own", client_token(&alice, &fwd)))
        .await
        .expect("alice's connection");

    // Mallory's path names alice's connection.
    let mut theirs = made.clone();
    let path = theirs.path.as_mut().unwrap();
    // A refresh re-sends the path as returned, the endpoint's segment too.
    path.index = 1;
    path.path_segments[0].token = client_token(&mallory, &fwd);
    denied(
        caller.request(theirs.clone()).await,
        "was made by spiffe://cluster.local/ns/a/pod/alice",
    );
    match caller.close(theirs).await {
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        }
        Ok(()) => panic!("mallory closed alice's connection"),
    }

    // Alice refreshes and closes it.
    let mut again = made.clone();
    let path = again.path.as_mut().unwrap();
    path.index = 1;
    path.path_segments[0].token = client_token(&alice, &fwd);
    let refreshed = caller.request(again).await.expect("alice refreshes");
    assert_eq!(refreshed.id, made.id);
    caller.close(refreshed).await.expect("alice closes");
}

#[tokio::test]
async fn policies_are_chosen_like_nsms_policy_files() {
    let ca = TestCa::new(TD).unwrap();
    // No policies: a broken chain passes (what NSM_SERVER_POLICIES="" means).
    let served = serve(&ca, Policies::parse("").unwrap()).await;
    let (other, fwd) = (identity(&ca, "/other"), identity(&ca, "/fwd"));
    let caller = Caller::new(&served, &fwd, &fwd);
    caller
        .request(conn("none", client_token(&other, &other)))
        .await
        .expect("without policies the path is not checked");
}

#[tokio::test]
async fn monitor_shows_a_peer_only_the_connections_on_its_path() {
    use nsm_api::connection::MonitorScopeSelector;
    use nsm_api::connection::monitor_connection_client::MonitorConnectionClient;

    let ca = TestCa::new(TD).unwrap();
    let served = serve(&ca, Policies::server_default()).await;
    let (alice, fwd, other) = (
        identity(&ca, "/nsc"),
        identity(&ca, "/fwd"),
        identity(&ca, "/other"),
    );
    let made = Caller::new(&served, &fwd, &fwd)
        .request(conn("mon", client_token(&alice, &fwd)))
        .await
        .expect("a connection to watch");
    for (who, viewer, sees) in [("the forwarder", &fwd, true), ("a stranger", &other, false)] {
        let session = Dialer::new(Target::Unix(served.socket.clone()), WAIT)
            .with_tls(Some(viewer))
            .unwrap()
            .dial(Instant::now() + WAIT)
            .await
            .unwrap();
        let mut stream = MonitorConnectionClient::new(session.channel())
            .monitor_connections(MonitorScopeSelector::default())
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"))
            .into_inner();
        let initial = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .expect("the initial state");
        // Keyed by the endpoint's own segment id; this endpoint holds one.
        assert_eq!(
            initial.connections.len(),
            usize::from(sees),
            "{who} sees {:?} (made {})",
            initial.connections.keys(),
            made.id
        );
    }
}
