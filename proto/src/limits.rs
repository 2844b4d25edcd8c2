//! What one caller may send and hold, checked before any work is done, so
//! that no Request, Close or stream — trusted caller or not — can make a hop
//! allocate, loop or wait without bound. Every limit is documented here and
//! in README's security section; a message over a size limit is refused with
//! InvalidArgument naming the field and the limit, a caller over a
//! concurrency limit gets ResourceExhausted.
//!
//! The strings an NSM hop stores, logs or hands to the kernel side (ids,
//! names, labels, mechanism parameters, path segments, `extra_context`)
//! must also be free of control characters: log lines and error messages
//! built from them cannot be forged.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connection::{Connection, Mechanism, MonitorScopeSelector, PathSegment};
use crate::connectioncontext::ConnectionContext;
use crate::networkservice::NetworkServiceRequest;

/// Bytes of an id, name, network service, payload, mechanism class/type,
/// map key or path segment name.
pub const MAX_NAME: usize = 256;
/// Bytes of a label value, mechanism parameter or segment metric value.
pub const MAX_VALUE: usize = 64 * 1024;
/// Labels, mechanism parameters, segment metrics: entries per map.
pub const MAX_ENTRIES: usize = 64;
/// Path segments of a connection or selector.
pub const MAX_PATH_SEGMENTS: usize = 32;
/// Bytes of a path segment token (an ES256 JWT is well under 2 KiB).
pub const MAX_TOKEN: usize = 16 * 1024;
/// Mechanism preferences of a Request.
pub const MAX_MECHANISMS: usize = 16;
/// Entries of `extra_context`, and bytes of one value (a capture spec with
/// a thousand IPv6 exclusions is about 50 KiB).
pub const MAX_EXTRA_CONTEXT: usize = 64;
pub const MAX_EXTRA_VALUE: usize = 256 * 1024;
/// Entries of each `ip_context` list (addresses, routes, excluded prefixes,
/// neighbours, extra prefixes, prefix requests, policies) and routes of one
/// policy.
pub const MAX_IP_LIST: usize = 4096;
/// Network services in a monitor selector.
pub const MAX_SELECTOR_SERVICES: usize = 64;

/// Calls (Request, Close) one server works on at once.
pub const MAX_CONCURRENT_CALLS: usize = 1024;
/// Open connections one server accepts at once; beyond it a new connection
/// is closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Open MonitorConnections streams one server keeps: as many as connections,
/// since a forwarder watches each connection's endpoint with one (as NSM's do).
pub const MAX_MONITOR_SUBSCRIBERS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{field}: {len} {unit}, at most {max}")]
    TooLarge {
        field: String,
        len: usize,
        max: usize,
        unit: &'static str,
    },
    #[error("{field} contains control character U+{code:04X}")]
    ControlChar { field: String, code: u32 },
}

fn size(
    field: impl FnOnce() -> String,
    len: usize,
    max: usize,
    unit: &'static str,
) -> Result<(), LimitError> {
    if len > max {
        return Err(LimitError::TooLarge {
            field: field(),
            len,
            max,
            unit,
        });
    }
    Ok(())
}

/// A printable string of at most `max` bytes.
fn text(field: impl Fn() -> String, value: &str, max: usize) -> Result<(), LimitError> {
    size(&field, value.len(), max, "bytes")?;
    match value.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(LimitError::ControlChar {
            field: field(),
            code: c as u32,
        }),
    }
}

fn map(field: &str, m: &HashMap<String, String>, max_value: usize) -> Result<(), LimitError> {
    size(|| field.to_owned(), m.len(), MAX_ENTRIES, "entries")?;
    for (k, v) in m {
        text(|| format!("{field} key {k:?}"), k, MAX_NAME)?;
        text(|| format!("{field}[{k:?}]"), v, max_value)?;
    }
    Ok(())
}

fn mechanism(field: &str, m: &Mechanism) -> Result<(), LimitError> {
    text(|| format!("{field}.cls"), &m.cls, MAX_NAME)?;
    text(|| format!("{field}.type"), &m.r#type, MAX_NAME)?;
    map(&format!("{field}.parameters"), &m.parameters, MAX_VALUE)
}

fn segments(field: &str, segs: &[PathSegment]) -> Result<(), LimitError> {
    size(
        || field.to_owned(),
        segs.len(),
        MAX_PATH_SEGMENTS,
        "segments",
    )?;
    for (i, s) in segs.iter().enumerate() {
        text(|| format!("{field}[{i}].name"), &s.name, MAX_NAME)?;
        text(|| format!("{field}[{i}].id"), &s.id, MAX_NAME)?;
        text(|| format!("{field}[{i}].token"), &s.token, MAX_TOKEN)?;
        map(&format!("{field}[{i}].metrics"), &s.metrics, MAX_VALUE)?;
    }
    Ok(())
}

fn context(ctx: &ConnectionContext) -> Result<(), LimitError> {
    let field = "connection.context.extra_context";
    size(
        || field.to_owned(),
        ctx.extra_context.len(),
        MAX_EXTRA_CONTEXT,
        "entries",
    )?;
    for (k, v) in &ctx.extra_context {
        text(|| format!("{field} key {k:?}"), k, MAX_NAME)?;
        text(|| format!("{field}[{k:?}]"), v, MAX_EXTRA_VALUE)?;
    }
    if let Some(ip) = &ctx.ip_context {
        let lists = [
            ("src_ip_addrs", ip.src_ip_addrs.len()),
            ("dst_ip_addrs", ip.dst_ip_addrs.len()),
            ("src_routes", ip.src_routes.len()),
            ("dst_routes", ip.dst_routes.len()),
            ("excluded_prefixes", ip.excluded_prefixes.len()),
            ("ip_neighbors", ip.ip_neighbors.len()),
            ("extra_prefix_request", ip.extra_prefix_request.len()),
            ("extra_prefixes", ip.extra_prefixes.len()),
            ("policies", ip.policies.len()),
        ];
        for (name, len) in lists {
            size(
                || format!("connection.context.ip_context.{name}"),
                len,
                MAX_IP_LIST,
                "entries",
            )?;
        }
        let routes: usize = ip.policies.iter().map(|p| p.routes.len()).sum();
        size(
            || "connection.context.ip_context.policies[].routes".to_owned(),
            routes,
            MAX_IP_LIST,
            "entries",
        )?;
    }
    if let Some(dns) = &ctx.dns_context {
        size(
            || "connection.context.dns_context.configs".to_owned(),
            dns.configs.len(),
            MAX_ENTRIES,
            "entries",
        )?;
    }
    Ok(())
}

/// A connection as a Request or Close carries it.
pub fn check_connection(c: &Connection) -> Result<(), LimitError> {
    text(|| "connection.id".into(), &c.id, MAX_NAME)?;
    text(
        || "connection.network_service".into(),
        &c.network_service,
        MAX_NAME,
    )?;
    text(
        || "connection.network_service_endpoint_name".into(),
        &c.network_service_endpoint_name,
        MAX_NAME,
    )?;
    text(|| "connection.payload".into(), &c.payload, MAX_NAME)?;
    map("connection.labels", &c.labels, MAX_VALUE)?;
    if let Some(m) = &c.mechanism {
        mechanism("connection.mechanism", m)?;
    }
    if let Some(p) = &c.path {
        segments("connection.path.path_segments", &p.path_segments)?;
    }
    if let Some(ctx) = &c.context {
        context(ctx)?;
    }
    Ok(())
}

/// A NetworkServiceRequest: its connection and mechanism preferences.
pub fn check_request(r: &NetworkServiceRequest) -> Result<(), LimitError> {
    if let Some(c) = &r.connection {
        check_connection(c)?;
    }
    let prefs = &r.mechanism_preferences;
    size(
        || "mechanism_preferences".into(),
        prefs.len(),
        MAX_MECHANISMS,
        "entries",
    )?;
    for (i, m) in prefs.iter().enumerate() {
        mechanism(&format!("mechanism_preferences[{i}]"), m)?;
    }
    Ok(())
}

/// A MonitorConnections selector.
pub fn check_selector(s: &MonitorScopeSelector) -> Result<(), LimitError> {
    segments("selector.path_segments", &s.path_segments)?;
    size(
        || "selector.network_services".into(),
        s.network_services.len(),
        MAX_SELECTOR_SERVICES,
        "entries",
    )?;
    for (i, n) in s.network_services.iter().enumerate() {
        text(|| format!("selector.network_services[{i}]"), n, MAX_NAME)?;
    }
    Ok(())
}

/// A caller's string as a log field: escaped (control characters cannot
/// forge lines) and cut to [`MAX_NAME`] characters.
pub fn loggable(s: &str) -> String {
    let cut: String = s.chars().take(MAX_NAME).collect();
    let mut out = format!("{cut:?}");
    if cut.len() < s.len() {
        out.push('…');
    }
    out
}

/// Admission of calls: at most a fixed number at once, and beyond that a
/// refusal at once (never a queue that grows with the callers).
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max: usize,
}

impl Admission {
    pub fn new(max: usize) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for one call, held until dropped; ResourceExhausted when all
    /// are taken.
    pub fn enter(&self, what: &str) -> Result<OwnedSemaphorePermit, tonic::Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "{what}: {} calls are in progress already, the most this server takes at once; \
                 try again",
                self.max
            ))
        })
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(MAX_CONCURRENT_CALLS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Path;

    fn conn() -> Connection {
        Connection {
            id: "f2".into(),
            labels: [("app".to_string(), "x".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn plain_connections_pass() {
        check_connection(&conn()).unwrap();
        check_request(&NetworkServiceRequest {
            connection: Some(conn()),
            mechanism_preferences: vec![Mechanism::default()],
        })
        .unwrap();
    }

    #[test]
    fn each_limit_names_the_field() {
        let mut c = conn();
        c.labels.insert("app".into(), "x\u{7}".into());
        assert_eq!(
            check_connection(&c).unwrap_err().to_string(),
            "connection.labels[\"app\"] contains control character U+0007"
        );
        let mut c = conn();
        c.labels = (0..=MAX_ENTRIES)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            check_connection(&c).unwrap_err().to_string(),
            format!(
                "connection.labels: {} entries, at most {MAX_ENTRIES}",
                MAX_ENTRIES + 1
            )
        );
        let mut c = conn();
        c.labels.insert("big".into(), "1".repeat(MAX_VALUE + 1));
        assert!(
            check_connection(&c)
                .unwrap_err()
                .to_string()
                .contains("at most 65536")
        );
        let mut c = conn();
        c.id = "x".repeat(MAX_NAME + 1);
        assert!(
            check_connection(&c)
                .unwrap_err()
                .to_string()
                .starts_with("connection.id: 257 bytes")
        );
        let mut c = conn();
        c.path = Some(Path {
            index: 0,
            path_segments: vec![PathSegment::default(); MAX_PATH_SEGMENTS + 1],
        });
        assert!(
            check_connection(&c)
                .unwrap_err()
                .to_string()
                .contains("segments, at most 32")
        );
        let r = NetworkServiceRequest {
            connection: Some(conn()),
            mechanism_preferences: vec![Mechanism::default(); MAX_MECHANISMS + 1],
        };
        assert!(
            check_request(&r)
                .unwrap_err()
                .to_string()
                .starts_with("mechanism_preferences")
        );
    }

    #[test]
    fn log_fields_are_escaped_and_short() {
        assert_eq!(loggable("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(MAX_NAME + 10);
        let l = loggable(&long);
        assert!(l.ends_with('…') && l.len() < MAX_NAME + 10, "{l}");
    }

    #[test]
    fn admission_refuses_beyond_its_slots_and_frees_them() {
        let a = Admission::new(2);
        let one = a.enter("Request").unwrap();
        let _two = a.enter("Request").unwrap();
        let e = a.enter("Request").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("2 calls are in progress"),
            "{}",
            e.message()
        );
        drop(one);
        assert_eq!(a.available(), 1);
        let _again = a.enter("Request").unwrap();
    }
}
