//! Checks every request before the chain sees it: present and non-empty
//! ids, then the limits every hop applies (`nsm_api::limits`: sizes, and no
//! control characters in the strings an endpoint stores, logs or hands to
//! the kernel side). Paths, addresses and prefixes are checked by the
//! elements that own them.

use nsm_api::chain::Req;
use nsm_api::connection::{Connection, MonitorScopeSelector};
use nsm_api::limits::{self, LimitError};
use nsm_api::networkservice::NetworkServiceRequest;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    #[error("request.connection is missing")]
    NoConnection,
    #[error("connection.id is empty")]
    EmptyId,
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// A connection as Request or Close carries it.
pub fn connection(c: &Connection) -> Result<(), ValidateError> {
    if c.id.is_empty() {
        return Err(ValidateError::EmptyId);
    }
    Ok(limits::check_connection(c)?)
}

/// A NetworkServiceRequest, turned into the chain's [`Req`].
pub fn request(r: NetworkServiceRequest) -> Result<Req, ValidateError> {
    limits::check_request(&r)?;
    let conn = r.connection.ok_or(ValidateError::NoConnection)?;
    if conn.id.is_empty() {
        return Err(ValidateError::EmptyId);
    }
    Ok(Req {
        conn,
        preferences: r.mechanism_preferences,
    })
}

/// A MonitorConnections selector.
pub fn selector(s: &MonitorScopeSelector) -> Result<(), ValidateError> {
    Ok(limits::check_selector(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_api::connection::Mechanism;

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
