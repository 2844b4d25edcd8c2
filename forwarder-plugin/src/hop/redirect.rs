//! Client-side redirect rules an endpoint asks for in its returned
//! connection, and the names they are installed under.

use nsm_api::connection::Connection;
use serde::{Deserialize, Serialize};

use super::error::{HopError, Result};
use crate::rules::{BackendKind, Owner, Plan, RedirectSpec};

pub use nsm_api::contract::{
    CLIENT_PROXY_KEY, CLIENT_REDIRECT_KEY, CONTRACT_PREFIX, FEATURE_CLIENT_CAPTURE,
    FEATURE_CLIENT_PROXY, FEATURE_CLIENT_REDIRECT, FORWARDER_FEATURES_KEY, FORWARDER_PROXIES_KEY,
    announce, announce_features, announced_proxies, has_feature,
};

/// The validated redirect spec the endpoint asked for, if any. An absent or
/// blank value means no rules.
pub fn client_redirect(conn: &Connection) -> Result<Option<RedirectSpec>> {
    let Some(text) = conn
        .context
        .as_ref()
        .and_then(|c| c.extra_context.get(CLIENT_REDIRECT_KEY))
        .filter(|t| !t.trim().is_empty())
    else {
        return Ok(None);
    };
    let err = |source| HopError::Redirect {
        key: CLIENT_REDIRECT_KEY,
        source,
    };
    let spec = RedirectSpec::from_json(text).map_err(err)?;
    // Plan::new checks the combinations the spec alone does not.
    Plan::new(&spec).map_err(err)?;
    Ok(Some(spec))
}

/// The owner (nft table `inet <owner>`, iptables chains `<OWNER>_*`) of one
/// connection's rules: `fp_` and 13 hex digits of a hash of the connection
/// id. One owner per connection lets several connections of one client
/// namespace keep their own rules side by side.
pub fn owner_for(connection_id: &str) -> Owner {
    let hash = fnv1a64(connection_id.as_bytes()) & ((1 << 52) - 1);
    Owner::new(&format!("fp_{hash:013x}")).expect("fp_ + 13 hex digits is a valid owner")
}

/// The rule backends the hop applies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    #[default]
    Nft,
    Iptables,
}

impl BackendName {
    pub fn kind(self) -> BackendKind {
        match self {
            BackendName::Nft => BackendKind::Nft,
            BackendName::Iptables => BackendKind::Iptables,
        }
    }
}

impl std::fmt::Display for BackendName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendName::Nft => "nft",
            BackendName::Iptables => "iptables",
        })
    }
}

/// 64-bit FNV-1a: a stable name, not a security boundary.
pub(crate) fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_api::connectioncontext::ConnectionContext;

    fn with_extra(value: Option<&str>) -> Connection {
        Connection {
            context: Some(ConnectionContext {
                extra_context: value
                    .map(|v| (CLIENT_REDIRECT_KEY.to_owned(), v.to_owned()))
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn absent_or_blank_means_no_rules() {
        assert_eq!(client_redirect(&Connection::default()).unwrap(), None);
        assert_eq!(client_redirect(&with_extra(None)).unwrap(), None);
        assert_eq!(client_redirect(&with_extra(Some("  "))).unwrap(), None);
    }

    #[test]
    fn a_spec_is_parsed_and_validated() {
        let spec = client_redirect(&with_extra(Some(r#"{"version":1,"outboundPort":15001}"#)))
            .unwrap()
            .unwrap();
        assert_eq!(spec.outbound_port.0, 15001);
        for bad in [
            r#"{"version":2}"#,
            r#"{"outboundPort":0}"#,
            r#"{"noSuchField":1}"#,
            "not json",
            r#"{"outboundPort":15006}"#,
        ] {
            let e = client_redirect(&with_extra(Some(bad))).unwrap_err();
            assert!(matches!(e, HopError::Redirect { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(CLIENT_REDIRECT_KEY), "{e}");
        }
    }

    #[test]
    fn announcing_replaces_whatever_the_caller_sent_of_ours() {
        let mut c = with_extra(Some(r#"{"version":1}"#));
        let extra = &mut c.context.as_mut().unwrap().extra_context;
        extra.insert(FORWARDER_FEATURES_KEY.into(), "made-up".into());
        extra.insert("mesh-proxy.v9/anything".into(), "x".into());
        extra.insert("other".into(), "kept".into());
        announce_features(&mut c);
        let extra = &c.context.as_ref().unwrap().extra_context;
        assert_eq!(extra.len(), 2, "{extra:?}");
        assert_eq!(extra["other"], "kept");
        assert!(has_feature(&c, FEATURE_CLIENT_CAPTURE));
        assert!(has_feature(&c, FEATURE_CLIENT_REDIRECT));
        assert!(!has_feature(&c, "made-up"));
        assert!(!has_feature(&Connection::default(), FEATURE_CLIENT_CAPTURE));
    }

    #[test]
    fn owners_are_stable_distinct_and_valid() {
        let a = owner_for("3f1c0a5e-8a4e-4b8c-9d6f-0f8c2b7a1e11");
        assert_eq!(a, owner_for("3f1c0a5e-8a4e-4b8c-9d6f-0f8c2b7a1e11"));
        assert_ne!(a, owner_for("3f1c0a5e-8a4e-4b8c-9d6f-0f8c2b7a1e12"));
        assert_eq!(a.as_str().len(), 16);
        assert!(a.as_str().starts_with("fp_"));
        assert_eq!(owner_for("").as_str().len(), 16);
    }
}
