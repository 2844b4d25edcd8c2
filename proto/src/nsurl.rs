//! Network service URLs as the webhook puts them in `NSM_NETWORK_SERVICES`:
//! `<mechanism>://<service>[@<domain>]/<iface>?<label>=<value>&…`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::connection::Mechanism;
use crate::mechanism::{self, MechanismError, keys};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsUrl {
    /// Mechanism type in upper case (`KERNEL`, `MEMIF`, …).
    pub mechanism: String,
    /// `service` or `service@domain`.
    pub network_service: String,
    /// Requested interface name, if the URL has a path.
    pub interface: Option<String>,
    /// Query parameters; repeated keys are joined with ",".
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsUrlError {
    #[error("{0:?}: expected <mechanism>://<service>[@domain]/<iface>?k=v")]
    Shape(String),
    #[error("{url:?}: network service name is empty")]
    EmptyService { url: String },
    #[error("{url:?}: {source}")]
    Interface {
        url: String,
        #[source]
        source: MechanismError,
    },
    #[error("{url:?}: bad percent-encoding")]
    Encoding { url: String },
    #[error("{url:?}: label {key:?} has a control character")]
    Control { url: String, key: String },
}

impl NsUrl {
    /// The mechanism preference this URL asks for (`name` set when the URL has a path).
    pub fn mechanism(&self) -> Mechanism {
        let mut m = Mechanism {
            cls: mechanism::CLS_LOCAL.to_owned(),
            r#type: self.mechanism.clone(),
            parameters: Default::default(),
        };
        if let Some(name) = &self.interface {
            m.parameters.insert(keys::NAME.to_owned(), name.clone());
        }
        m
    }

    /// Parses a comma-separated list, as in `NSM_NETWORK_SERVICES`.
    pub fn parse_list(list: &str) -> Result<Vec<NsUrl>, NsUrlError> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect()
    }
}

fn percent_decode(s: &str, url: &str) -> Result<String, NsUrlError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or_else(|| NsUrlError::Encoding {
                        url: url.to_owned(),
                    })?;
                let hex = std::str::from_utf8(hex).ok();
                let v = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| NsUrlError::Encoding {
                        url: url.to_owned(),
                    })?;
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| NsUrlError::Encoding {
        url: url.to_owned(),
    })
}

impl FromStr for NsUrl {
    type Err = NsUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let shape = || NsUrlError::Shape(url.to_owned());
        let (scheme, rest) = url.split_once("://").ok_or_else(shape)?;
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(shape());
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (service, path) = match rest.split_once('/') {
            Some((s, p)) => (s, Some(p)),
            None => (rest, None),
        };
        if service.is_empty() {
            return Err(NsUrlError::EmptyService {
                url: url.to_owned(),
            });
        }
        if service.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(shape());
        }
        // Upstream takes the last path segment as the interface name.
        let interface = path
            .and_then(|p| p.rsplit('/').next())
            .filter(|p| !p.is_empty())
            .map(|p| percent_decode(p, url))
            .transpose()?;
        if let Some(name) = &interface {
            mechanism::validate_interface_name(name).map_err(|source| NsUrlError::Interface {
                url: url.to_owned(),
                source,
            })?;
        }
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k, url)?, percent_decode(v, url)?);
            if k.chars().chain(v.chars()).any(char::is_control) {
                return Err(NsUrlError::Control {
                    url: url.to_owned(),
                    key: k,
                });
            }
            labels
                .entry(k)
                .and_modify(|old| {
                    old.push(',');
                    old.push_str(&v);
                })
                .or_insert(v);
        }
        Ok(NsUrl {
            mechanism: scheme.to_ascii_uppercase(),
            network_service: service.to_owned(),
            interface,
            labels,
        })
    }
}

/// `s` with everything but URL-unreserved characters percent-encoded, so
/// that what [`NsUrl`]'s `Display` writes parses back to the same parts.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for NsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}",
            self.mechanism.to_ascii_lowercase(),
            self.network_service
        )?;
        if let Some(i) = &self.interface {
            write!(f, "/{}", percent_encode(i))?;
        }
        let mut sep = '?';
        for (k, v) in &self.labels {
            write!(f, "{sep}{}={}", percent_encode(k), percent_encode(v))?;
            sep = '&';
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_annotation_forms() {
        let u: NsUrl = "kernel://mesh-proxy/nsm-1".parse().unwrap();
        assert_eq!(u.mechanism, "KERNEL");
        assert_eq!(u.network_service, "mesh-proxy");
        assert_eq!(u.interface.as_deref(), Some("nsm-1"));
        assert!(u.labels.is_empty());
        assert_eq!(u.mechanism().parameters["name"], "nsm-1");

        let u: NsUrl = "kernel://autoscale-istio-proxy@my.cluster2/nsm-1?app=greeting&x=1&x=2"
            .parse()
            .unwrap();
        assert_eq!(u.network_service, "autoscale-istio-proxy@my.cluster2");
        assert_eq!(u.labels["app"], "greeting");
        assert_eq!(u.labels["x"], "1,2");

        let u: NsUrl = "kernel://svc".parse().unwrap();
        assert_eq!(u.interface, None);
        assert!(u.mechanism().parameters.is_empty());
    }

    #[test]
    fn parses_lists_and_round_trips() {
        let l = NsUrl::parse_list("kernel://a/nsm-1, kernel://b/nsm-2?k=v").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].to_string(), "kernel://b/nsm-2?k=v");
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "mesh-proxy",
            "://x",
            "kernel:///nsm-1",
            "kernel://svc/0123456789abcdef",
            "kernel://svc/a%2Fb",
            "kernel://svc/x?k=%0a",
            "kernel://svc/x?k=%zz",
        ] {
            assert!(bad.parse::<NsUrl>().is_err(), "{bad} accepted");
        }
    }
}
