//! Checks every request before the chain sees it: present and non-empty
//! ids, and no control characters in the strings an endpoint stores, logs or
//! hands to the kernel side (labels, mechanism parameters, names, path).
//! Paths, addresses and prefixes are checked by the elements that own them.

use std::collections::HashMap;

use nsm_api::chain::Req;
use nsm_api::connection::{Connection, Mechanism, MonitorScopeSelector, PathSegment};
use nsm_api::networkservice::NetworkServiceRequest;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    #[error("request.connection is missing")]
    NoConnection,
    #[error("connection.id is empty")]
    EmptyId,
    #[error("{field} contains control character U+{code:04X}")]
    ControlChar { field: String, code: u32 },
}

fn check(field: impl FnOnce() -> String, value: &str) -> Result<(), ValidateError> {
    match value.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(ValidateError::ControlChar {
            field: field(),
            code: c as u32,
        }),
    }
}

fn check_map(field: &str, map: &HashMap<String, String>) -> Result<(), ValidateError> {
    for (k, v) in map {
        check(|| format!("{field} key {k:?}"), k)?;
        check(|| format!("{field}[{k:?}]"), v)?;
    }
    Ok(())
}

fn check_mechanism(field: &str, m: &Mechanism) -> Result<(), ValidateError> {
    check(|| format!("{field}.cls"), &m.cls)?;
    check(|| format!("{field}.type"), &m.r#type)?;
    check_map(&format!("{field}.parameters"), &m.parameters)
}

fn check_segments(field: &str, segs: &[PathSegment]) -> Result<(), ValidateError> {
    for (i, s) in segs.iter().enumerate() {
        check(|| format!("{field}[{i}].name"), &s.name)?;
        check(|| format!("{field}[{i}].id"), &s.id)?;
        check(|| format!("{field}[{i}].token"), &s.token)?;
        check_map(&format!("{field}[{i}].metrics"), &s.metrics)?;
    }
    Ok(())
}

/// A connection as Request or Close carries it.
pub fn connection(c: &Connection) -> Result<(), ValidateError> {
    if c.id.is_empty() {
        return Err(ValidateError::EmptyId);
    }
    check(|| "connection.id".into(), &c.id)?;
    check(|| "connection.network_service".into(), &c.network_service)?;
    check(
        || "connection.network_service_endpoint_name".into(),
        &c.network_service_endpoint_name,
    )?;
    check(|| "connection.payload".into(), &c.payload)?;
    check_map("connection.labels", &c.labels)?;
    if let Some(m) = &c.mechanism {
        check_mechanism("connection.mechanism", m)?;
    }
    if let Some(p) = &c.path {
        check_segments("connection.path.path_segments", &p.path_segments)?;
    }
    if let Some(ctx) = &c.context {
        check_map("connection.context.extra_context", &ctx.extra_context)?;
    }
    Ok(())
}

/// A NetworkServiceRequest, turned into the chain's [`Req`].
pub fn request(r: NetworkServiceRequest) -> Result<Req, ValidateError> {
    let conn = r.connection.ok_or(ValidateError::NoConnection)?;
    connection(&conn)?;
    for (i, m) in r.mechanism_preferences.iter().enumerate() {
        check_mechanism(&format!("mechanism_preferences[{i}]"), m)?;
    }
    Ok(Req {
        conn,
        preferences: r.mechanism_preferences,
    })
}

/// A MonitorConnections selector.
pub fn selector(s: &MonitorScopeSelector) -> Result<(), ValidateError> {
    check_segments("selector.path_segments", &s.path_segments)?;
    for (i, n) in s.network_services.iter().enumerate() {
        check(|| format!("selector.network_services[{i}]"), n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_conn() -> Connection {
        Connection {
            id: "f2".into(),
            labels: [("app".to_string(), "x".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_plain_requests() {
        let r = NetworkServiceRequest {
            connection: Some(ok_conn()),
            mechanism_preferences: vec![Mechanism::default()],
        };
        assert!(request(r).is_ok());
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(
            request(NetworkServiceRequest::default()),
            Err(ValidateError::NoConnection)
        );
        let mut c = ok_conn();
        c.id.clear();
        assert_eq!(connection(&c), Err(ValidateError::EmptyId));

        let mut c = ok_conn();
        c.labels.insert("app".into(), "x\u{7}".into());
        assert_eq!(
            connection(&c).unwrap_err().to_string(),
            "connection.labels[\"app\"] contains control character U+0007"
        );

        let mut m = Mechanism::default();
        m.parameters.insert("name".into(), "eth\n0".into());
        let r = NetworkServiceRequest {
            connection: Some(ok_conn()),
            mechanism_preferences: vec![Mechanism::default(), m],
        };
        assert_eq!(
            request(r).unwrap_err().to_string(),
            "mechanism_preferences[1].parameters[\"name\"] contains control character U+000A"
        );
    }
}
