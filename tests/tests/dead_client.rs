//! A dead pod's connection is closed without waiting for its expiry: the
//! client (nsc-init) is killed without a Close and its network namespace
//! removed; the forwarder notices the namespace gone, undoes the
//! connection and Closes it downstream, so the endpoint's namespace is back
//! to what it was (its interface set empty, its addresses free) within
//! seconds, not at the token's expiry.

use std::time::Duration;

use examples::inspect;
use examples::lab::{Lab, LabConfig};
use examples::nsc;
use examples::proxy::ProxyKind;
use nix::sys::signal::Signal;

const UP: Duration = Duration::from_secs(20);

#[test]
fn a_dead_pods_connection_is_closed_without_waiting_for_expiry() {
    if !nsm_tests::require_root("dead_client") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        // Far beyond the test: only the namespace's death can close it.
        token_lifetime: Some("1h".into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let client = lab.client().unwrap();
    let (mut nsc, up) = nsc::watch(
        &client,
        &lab.nsc_options("web-0").unwrap(),
        &lab.dir.join("nsc.log"),
        UP,
    )
    .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    lab.get_through_proxy(&client, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"));

    // The pod dies: no Close, and its namespace goes.
    nsc.signal(Signal::SIGKILL);
    nsc.wait(UP).unwrap_or_else(|e| panic!("{e}"));
    drop(client);

    if let Err(left) = inspect::wait_nse_back_to(&lab.nse_ns, &before, Duration::from_secs(15)) {
        panic!(
            "the endpoint's namespace after the client died: {left:?}{}",
            lab.logs()
        );
    }
    let log = lab.forwarder().unwrap().log();
    assert!(
        log.contains("the client's network namespace is gone: closing its connection"),
        "the forwarder says why it closed {}: {}",
        up.iface,
        lab.logs()
    );
}
