//! A control-plane crash never lets a client's traffic past the proxy:
//! mesh-proxy-nse is killed (SIGKILL) while a client's connection is up and
//! started again as it was; it adopts the connection its previous run
//! recorded (`NSM_STATE_DIR`), so the client's TCP keeps going through the
//! proxy — before the restart, and at once after it. The connection's Close
//! then leaves the endpoint's namespace as it was, and new clients are
//! served as before.

use std::time::Duration;

use examples::inspect;
use examples::lab::{Lab, LabConfig};
use examples::namespace::Namespace;
use examples::nsc;
use examples::proxy::ProxyKind;
use nix::sys::signal::Signal;

const UP: Duration = Duration::from_secs(20);
const IO: Duration = Duration::from_secs(5);

/// TCP from `client` reaches the server through the endpoint's proxy.
fn assert_proxied(lab: &Lab, client: &Namespace, when: &str) {
    if let Err(e) = lab.get_through_proxy(client, IO) {
        panic!("{when}: {e}");
    }
}

#[test]
fn a_restarted_endpoint_keeps_its_clients_behind_the_proxy() {
    if !nsm_tests::require_root("nse_restart") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let client = lab.client().unwrap();
    let opts = lab.nsc_options("web-0").unwrap();
    let (mut held, _) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP)
        .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    assert_proxied(&lab, &client, "before the crash");

    let nse = lab.nse().unwrap();
    nse.signal(Signal::SIGKILL);
    nse.wait(UP).unwrap_or_else(|e| panic!("{e}"));
    assert_proxied(&lab, &client, "while the endpoint is down");

    let log_len = lab.nse().unwrap().log().len();
    lab.start_nse().unwrap_or_else(|e| panic!("{e}"));
    let line = lab
        .nse()
        .unwrap()
        .wait_until("its start-up", UP, |p| {
            let log = p.log();
            let new = &log[log_len..];
            new.lines()
                .find(|l| l.contains("adopted the connections") || l.contains("serving "))
                .map(str::to_owned)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        line.contains("adopted the connections") && line.contains("connections=1"),
        "the restarted endpoint adopts the one live connection: {line}"
    );
    assert_proxied(&lab, &client, "right after the restart");

    // A new client is served by the restarted endpoint, through the proxy.
    let other = lab.client().unwrap();
    let (mut second, _) = nsc::watch(
        &other,
        &lab.nsc_options("web-1").unwrap(),
        &lab.dir.join("nsc-1.log"),
        UP,
    )
    .unwrap_or_else(|e| panic!("a new client after the restart: {e}{}", lab.logs()));
    assert_proxied(&lab, &other, "a new client after the restart");

    // Close of both: the adopted one leaves the table once its interface is gone.
    for (who, p) in [("web-0", &mut held), ("web-1", &mut second)] {
        let st = p.terminate(UP).unwrap_or_else(|e| panic!("{e}"));
        assert!(st.success(), "{who}'s nsc-init closed: {}", p.tail());
    }
    if let Err(left) = inspect::wait_nse_back_to(&lab.nse_ns, &before, Duration::from_secs(10)) {
        panic!(
            "the endpoint's namespace after Close: {left:?}{}",
            lab.logs()
        );
    }
}

/// A ruleset flushed behind the endpoint's back (an operator, another
/// agent) is put back within about a second while a connection is live:
/// the client's TCP goes through the proxy again without any refresh.
#[test]
fn a_flushed_ruleset_is_restored_while_connections_live() {
    if !nsm_tests::require_root("nse_restart") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let client = lab.client().unwrap();
    let (_held, _) = nsc::watch(
        &client,
        &lab.nsc_options("web-0").unwrap(),
        &lab.dir.join("nsc.log"),
        UP,
    )
    .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    assert_proxied(&lab, &client, "before the flush");
    lab.nse_ns.exec(&["nft", "flush", "ruleset"]).unwrap();
    let restored = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        lab.nse_ns
            .exec(&["nft", "list", "table", "inet", "mesh_proxy_nse"])
            .is_ok_and(|t| t.contains("elements"))
    });
    assert!(restored, "the endpoint's table is back{}", lab.logs());
    assert_proxied(&lab, &client, "after the flush");
    let log = lab.nse().unwrap().log();
    assert!(
        log.contains("repaired the redirect rules"),
        "the endpoint says it repaired them: {log}"
    );
}
