//! Fail closed on the client's side: the capture rules the forwarder
//! applied in a pod's namespace are flushed behind its back (a tool in the
//! pod, a careless script); the forwarder finds the drift and applies them
//! again within seconds, and the client's traffic goes through the proxy
//! again.

use std::time::Duration;

use examples::lab::{Lab, LabConfig};
use examples::proxy::ProxyKind;
use forwarder_plugin::netns::Netns;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_client_rules_are_applied_again() {
    if !nsm_tests::require_root("client_rules_drift") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let c = lab.direct_client("drift");
    let ns = lab.client().unwrap();
    let netns = Netns::open(ns.name()).unwrap();
    let conn = c
        .request(&netns, "web-0", "mesh-proxy", "nsm-1", &[])
        .await
        .unwrap_or_else(|e| panic!("Request: {e}{}", lab.logs()));
    lab.get_through_proxy(&ns, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"));
    let rules = ns.exec(&["nft", "list", "ruleset"]).unwrap();
    assert!(
        rules.contains("table"),
        "the forwarder applied capture rules: {rules}"
    );

    ns.exec(&["nft", "flush", "ruleset"]).unwrap();
    assert!(
        !ns.exec(&["nft", "list", "ruleset"])
            .unwrap()
            .contains("table")
    );
    let log_len = lab.forwarder().unwrap().log().len();
    lab.forwarder()
        .unwrap()
        .wait_until("the rules' repair", Duration::from_secs(15), |p| {
            p.log()[log_len..]
                .contains("the client's rules had drifted")
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}{}", lab.logs()));
    assert_eq!(ns.exec(&["nft", "list", "ruleset"]).unwrap(), rules);
    lab.get_through_proxy(&ns, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("after the repair: {e}"));
    c.close(&conn).await.unwrap();
}
