//! Many connections at once (nsm-wire.md §9 case 25): 200 parallel Requests,
//! each on its own fresh unix connection as forwarders dial them, get distinct
//! addresses; parallel Closes free everything and leave no descriptor behind.

mod nse_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use nse_support::*;
use nsm_api::connection::MonitorScopeSelector;

const PARALLEL: usize = 200;

/// The NSE's fd count once it has settled (no call in flight).
async fn settled_fds(nse: &Nse) -> usize {
    let mut last = nse.fds();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = nse.fds();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_get_distinct_addresses_and_closes_leak_nothing() {
    let nse = Arc::new(Nse::start(&[("NSM_CIDR_PREFIX", "198.18.64.0/18")]).await);
    // One round first, so lazily created runtime resources are in the baseline.
    let (warm, _) = nse.request(req_p()).await.unwrap();
    nse.close(warm).await.unwrap();
    let baseline = settled_fds(&nse).await;

    let requests: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let nse = nse.clone();
            tokio::spawn(async move { nse.request(req_p()).await.map(|(c, _)| c) })
        })
        .collect();
    let mut conns = Vec::new();
    for r in requests {
        conns.push(r.await.unwrap().expect("every parallel Request succeeds"));
    }
    let mut addrs = HashSet::new();
    let mut ids = HashSet::new();
    for c in &conns {
        for a in ip(c).src_ip_addrs.iter().chain(&ip(c).dst_ip_addrs) {
            assert!(addrs.insert(a.clone()), "{a} handed out twice");
        }
        assert!(ids.insert(nse_segment(c).id.clone()));
    }
    assert_eq!(addrs.len(), 2 * PARALLEL);
    let (_, state) = nse.monitor(MonitorScopeSelector::default()).await;
    assert_eq!(state.connections.len(), PARALLEL);

    let closes: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let nse = nse.clone();
            tokio::spawn(async move { nse.close(c).await.map(drop) })
        })
        .collect();
    for c in closes {
        c.await.unwrap().expect("every parallel Close succeeds");
    }

    let (_, state) = nse.monitor(MonitorScopeSelector::default()).await;
    assert!(
        state.connections.is_empty(),
        "{} connections left",
        state.connections.len()
    );
    // Everything went back to the pool: the next client gets the lowest pair.
    let (next, _) = nse.request(req_p()).await.unwrap();
    assert_eq!(ip(&next).dst_ip_addrs, ["198.18.64.0/32"]);
    nse.close(next).await.unwrap();

    let nse2 = nse.clone();
    eventually(&format!("NSE back to {baseline} fds"), move || {
        nse2.fds() <= baseline
    })
    .await;
}
