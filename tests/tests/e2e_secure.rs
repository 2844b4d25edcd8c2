//! The local chain as a cluster runs it: every hop with its own X.509-SVID
//! (the lab is its CA), mTLS on every unix socket with the netns fds passed
//! beneath TLS, and each hop's path segment carrying a token it signed for
//! the next (`sub` itself, `aud` the peer), so NSM's clients and policies
//! can check the whole path. Callers outside the trust domain, or without
//! TLS, get nothing.

use std::sync::Arc;
use std::time::Duration;

use examples::direct_client::{DirectClient, interface_ready};
use examples::lab::{FORWARDER_SPIFFE_PATH, Lab, LabConfig, NSE_SPIFFE_PATH, TRUST_DOMAIN};
use examples::proxy::ProxyKind;
use examples::svid::TestCa;
use forwarder_plugin::link::Links;
use forwarder_plugin::netns::Netns;
use nsm_api::connection::Connection;
use nsm_api::tls::Identity;
use serde_json::Value;

const LIFETIME: Duration = Duration::from_secs(600);

fn lab() -> Option<Lab> {
    if !nsm_tests::require_root("e2e_secure") {
        return None;
    }
    Some(
        Lab::start(LabConfig {
            proxy: ProxyKind::Builtin,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("lab: {e}")),
    )
}

fn id(path: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}{path}")
}

/// The claims of each path segment's token, by segment name.
fn claims(conn: &Connection) -> Vec<(String, Value)> {
    conn.path
        .as_ref()
        .expect("a path")
        .path_segments
        .iter()
        .map(|s| {
            let c = jsonwebtoken::dangerous::insecure_decode::<Value>(&s.token)
                .unwrap_or_else(|e| panic!("segment {}: token is no JWT: {e}", s.name))
                .claims;
            (s.name.clone(), c)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_proves_itself_and_signs_its_segment_for_the_next() {
    let Some(lab) = lab() else { return };
    let client_path = "/ns/default/pod/web-0";
    let identity = lab.identity(client_path).unwrap().expect("a secure lab");
    let client =
        DirectClient::new(&lab.forwarder_socket(), "web-0", LIFETIME, Some(&identity)).unwrap();
    let ns = lab.client().unwrap();
    let netns = Netns::open(ns.name()).unwrap();
    let conn = client
        .request(&netns, "web-0-0", "mesh-proxy", "nsm-1", &[])
        .await
        .unwrap_or_else(|e| panic!("a Request over mTLS: {e}{}", lab.logs()));
    let links = Links::open(&netns).unwrap();
    interface_ready(&links, "nsm-1")
        .await
        .unwrap_or_else(|e| panic!("the fd beneath TLS must plumb the interface: {e}"));

    let segs = claims(&conn);
    let names: Vec<&str> = segs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["web-0", "forwarder-plugin", "mesh-proxy-nse"]);
    let (client_id, fwd_id, nse_id) = (
        id(client_path),
        id(FORWARDER_SPIFFE_PATH),
        id(NSE_SPIFFE_PATH),
    );
    // Segment k's token: `sub` hop k; `aud` hop k+1 (the last: its caller).
    let want = [
        (&client_id, &fwd_id),
        (&fwd_id, &nse_id),
        (&nse_id, &fwd_id),
    ];
    for ((name, c), (sub, aud)) in segs.iter().zip(want) {
        assert_eq!(c["sub"], sub.as_str(), "segment {name}: {c}");
        assert_eq!(c["aud"], serde_json::json!([aud]), "segment {name}: {c}");
        assert!(c["exp"].as_u64().is_some(), "segment {name}: {c}");
    }
    client
        .close(&conn)
        .await
        .unwrap_or_else(|e| panic!("Close over mTLS: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_tls_or_from_another_trust_domain_get_nothing() {
    let Some(lab) = lab() else { return };
    let ns = lab.client().unwrap();
    let netns = Netns::open(ns.name()).unwrap();
    let stranger_ca = TestCa::new(TRUST_DOMAIN).unwrap();
    let stranger = Identity::new(
        stranger_ca
            .material(&stranger_ca.issue("/ns/default/pod/web-0").unwrap())
            .unwrap(),
    );
    let callers: [(&str, Option<&Arc<Identity>>); 2] =
        [("plaintext", None), ("another CA", Some(&stranger))];
    for (who, identity) in callers {
        for socket in [lab.forwarder_socket(), lab.nse_socket()] {
            let client = DirectClient::new(&socket, "web-0", LIFETIME, identity).unwrap();
            let err = client
                .request(&netns, "web-0-0", "mesh-proxy", "nsm-1", &[])
                .await
                .expect_err("a caller the trust domain does not vouch for must be refused");
            // The server hangs up at once: before or after the fd is queued.
            let code = match &err {
                examples::direct_client::DirectError::Call(e) => e.code(),
                examples::direct_client::DirectError::SendFd(_) => tonic::Code::Unavailable,
                e => panic!("{who} at {}: not a refusal: {e}", socket.display()),
            };
            assert_eq!(
                code,
                tonic::Code::Unavailable,
                "{who} at {}: {err}",
                socket.display()
            );
        }
    }
    let links = Links::open(&netns).unwrap();
    assert!(
        links.link("nsm-1").await.unwrap().is_none(),
        "nothing may be plumbed for a refused caller"
    );
}
