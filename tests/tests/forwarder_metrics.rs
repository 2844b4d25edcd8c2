//! The forwarder observed as NSM's components are: its Prometheus metrics
//! (`NSM_METRICS_LISTEN_ON`: Requests and Closes by gRPC code, their
//! latency, its plumbing time by rules backend, the connections it holds),
//! and its log level switched by SIGUSR1/SIGUSR2 while it keeps serving.

use std::time::Duration;

use examples::lab::{Lab, LabConfig};
use examples::nsc;
use examples::proxy::ProxyKind;
use nix::sys::signal::Signal;

const ADDR: &str = "127.0.0.1:19466";

fn scrape() -> String {
    nsm_tests::scrape_metrics(ADDR)
}

fn value(text: &str, series: &str) -> Option<f64> {
    nsm_tests::metric_value(text, series)
}

#[test]
fn the_forwarder_is_observable_as_nsms_components_are() {
    if !nsm_tests::require_root("forwarder_metrics") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        forwarder_args: vec!["--metrics-listen-on".into(), ADDR.into()],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let client = lab.client().unwrap();
    let (mut held, _) = nsc::watch(
        &client,
        &lab.nsc_options("web-0").unwrap(),
        &lab.dir.join("nsc.log"),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    let text = scrape();
    assert_eq!(
        value(
            &text,
            r#"nsm_forwarder_calls_total{method="Request",code="Ok"} "#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"nsm_forwarder_plumb_duration_seconds_count{backend="nft"} "#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "nsm_forwarder_connections "),
        Some(1.0),
        "{text}"
    );

    let st = held.terminate(Duration::from_secs(20)).unwrap();
    assert!(st.success(), "nsc-init closed: {}", held.tail());
    let text = scrape();
    assert_eq!(
        value(
            &text,
            r#"nsm_forwarder_calls_total{method="Close",code="Ok"} "#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "nsm_forwarder_connections "),
        Some(0.0),
        "{text}"
    );

    // SIGUSR1: TRACE; SIGUSR2: back to the configured level; still serving.
    let fwd = lab.forwarder().unwrap();
    for (signal, level) in [(Signal::SIGUSR1, "TRACE"), (Signal::SIGUSR2, "INFO")] {
        fwd.signal(signal);
        fwd.wait_for_line(
            &format!("log level {level}"),
            Duration::from_secs(10),
            |l| l.contains("log level") && l.contains(&format!("level={level}")),
        )
        .unwrap_or_else(|e| panic!("{signal}: {e}"));
    }
    assert!(fwd.try_status().is_none(), "the forwarder still runs");
    scrape();
}
