//! SVIDs from the SPIFFE Workload API, as SPIRE's agent serves them: our
//! client (the `spiffe` crate under `nsm_api::tls`) against a server built
//! on go-spiffe's own generated code (tests/go/workload-api, built by
//! tests/run.sh): the first SVID is taken, a rotation is applied without a
//! restart, and a server using that identity presents the rotated SVID.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use examples::svid::TestCa;
use nsm_api::tls::Source;
use nsm_tests::process::ChildGuard;

const WAIT: Duration = Duration::from_secs(10);
const FAKE: &str = "spiffe-workload-api-fake";

/// The Go server, or `None` (skipped) where Go could not build it outside CI.
fn fake_bin() -> Option<PathBuf> {
    nsm_tests::go_bin(FAKE, "tests/go/workload-api")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_come_from_the_workload_api_and_rotate_without_a_restart() {
    let Some(bin) = fake_bin() else { return };
    let dir = std::env::temp_dir().join(nsm_tests::unique("wlapi"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("k8s.nsm").unwrap();
    ca.write(&ca.issue("/ns/nsm/pod/nse-v1").unwrap(), &dir)
        .unwrap();
    let socket = dir.join("agent.sock");
    let mut cmd = Command::new(bin);
    cmd.args([
        "-socket",
        socket.to_str().unwrap(),
        "-dir",
        dir.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _agent = ChildGuard::spawn(&mut cmd);
    let end = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < end, "the Workload API did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let source = Source::WorkloadApi(format!("unix://{}", socket.display()));
    let identity = source
        .open(WAIT)
        .await
        .unwrap_or_else(|e| panic!("the first SVID: {e}"))
        .expect("an identity");
    assert_eq!(
        identity.current().id.to_string(),
        "spiffe://k8s.nsm/ns/nsm/pod/nse-v1"
    );

    ca.write(&ca.issue("/ns/nsm/pod/nse-v2").unwrap(), &dir)
        .unwrap();
    let end = Instant::now() + WAIT;
    while identity.current().id.to_string() != "spiffe://k8s.nsm/ns/nsm/pod/nse-v2" {
        assert!(Instant::now() < end, "the rotation did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What a peer sees: the rotated SVID at the next handshake.
    let cfg = identity.client_config().unwrap();
    let server_cfg = identity.server_config().unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let accept = tokio::spawn(async move {
        tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(b)
            .await
            .map(|_| ())
    });
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect("localhost".try_into().unwrap(), a)
        .await
        .expect("a handshake with the rotated SVID");
    let seen = nsm_api::tls::peer_svid(tls.get_ref().1).expect("the server's SVID");
    assert_eq!(seen.id.to_string(), "spiffe://k8s.nsm/ns/nsm/pod/nse-v2");
    accept
        .await
        .unwrap()
        .expect("the server side of the handshake");
    let _ = std::fs::remove_dir_all(&dir);
}
