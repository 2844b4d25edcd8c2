//! `proxy.process`: the proxy the endpoint starts and keeps running itself
//! in placement proxy (one shared by every connection), instead of one
//! started beside it by hand. The configuration format and the mechanism
//! (spawn, readiness, restarts, drain) are [`forwarder_plugin::proxy`];
//! here are the template fields the endpoint fills: its proxy's ports.

use forwarder_plugin::proxy::ProcessSpec;

pub use forwarder_plugin::proxy::ProcessConfig;

use super::config::ProxyConfig;

/// What to run for the proxy `proxy` describes: `{{proxyPort}}` and
/// `{{dnsPort}}` are `proxy.port` and `proxy.dnsPort`.
pub fn spec(process: &ProcessConfig, proxy: &ProxyConfig) -> Result<ProcessSpec, String> {
    let values = [
        ("proxyPort".to_owned(), proxy.port.0.to_string()),
        ("dnsPort".to_owned(), proxy.dns_port.0.to_string()),
    ]
    .into();
    process.spec(&values, proxy.port.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_plugin::proxy::Readiness;

    #[test]
    fn the_endpoint_fills_its_proxys_ports() {
        let c: ProcessConfig = serde_norway::from_str(
            "command: [haproxy, '-p{{proxyPort}}']\nenv: {DNS: '{{dnsPort}}'}\n",
        )
        .unwrap();
        let s = spec(&c, &ProxyConfig::default()).unwrap();
        assert_eq!(s.argv, ["haproxy", "-p15001"]);
        assert_eq!(s.env["DNS"], "15053");
        assert_eq!(s.ready, Readiness::Tcp(15001));
    }

    #[test]
    fn the_function_config_refuses_a_bad_process_at_load() {
        use super::super::config::{FunctionConfig, FunctionConfigError};
        let bad = |yaml: &str| match FunctionConfig::parse(yaml) {
            Err(FunctionConfigError::Invalid { key, why }) => format!("{key}: {why}"),
            other => panic!("{yaml}: {other:?}"),
        };
        let e = bad("version: 1\nproxy: {process: {command: [envoy, '{{podName}}']}}");
        assert!(
            e.starts_with("proxy.process: command:") && e.contains("podName"),
            "{e}"
        );
        let e = bad("version: 1\nplacement: sidecar\nproxy: {process: {command: [envoy]}}");
        assert!(e.contains("sidecarProxy"), "{e}");
        let e = bad("version: 1\nproxy: {port: 65500, process: {command: [envoy]}}");
        assert!(
            e.contains("do not fit"),
            "an upgrade has no ports to go to: {e}"
        );
        assert!(FunctionConfig::parse("version: 1\nproxy: {process: {command: [envoy]}}").is_ok());
    }
}
