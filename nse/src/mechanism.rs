//! The KERNEL mechanism as an NSM endpoint offers it (sdk `mechanisms` +
//! `kernel.NewServer`): the preset mechanism (refresh) or the first supported
//! preference; `inodeURL` = our own netns; `name` kept if given, otherwise
//! generated as `<service[:10]>-<random>` (15 bytes, Linux's limit). The
//! endpoint creates nothing: the forwarder builds the interface in our netns.

use nsm_api::connection::Mechanism;
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{self as mech, LINUX_IF_MAX_LENGTH, MechanismExt, keys};
use rand::Rng;

/// Mechanism types this endpoint serves.
pub const SUPPORTED: [&str; 1] = [mech::KERNEL];

/// Key of the interface metric NSM records in the endpoint's own path segment.
pub const SERVER_INTERFACE_METRIC: &str = "server_interface";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MechanismError {
    #[error(
        "cannot support any of the requested mechanisms: {offered} (this endpoint supports KERNEL)"
    )]
    NoneSupported { offered: String },
    #[error("unsupported mechanism {0:?} in connection.mechanism: this endpoint supports KERNEL")]
    Unsupported(String),
    #[error("KERNEL mechanism parameter name: {0}")]
    InterfaceName(#[from] mech::MechanismError),
}

/// The mechanism to serve: the preset one (it must be KERNEL), else the first supported preference.
pub fn select(
    preset: Option<&Mechanism>,
    preferences: &[Mechanism],
) -> Result<Mechanism, MechanismError> {
    if let Some(m) = preset {
        return if SUPPORTED.contains(&m.r#type.as_str()) {
            Ok(m.clone())
        } else {
            Err(MechanismError::Unsupported(m.r#type.clone()))
        };
    }
    preferences
        .iter()
        .find(|m| SUPPORTED.contains(&m.r#type.as_str()))
        .cloned()
        .ok_or_else(|| MechanismError::NoneSupported {
            offered: if preferences.is_empty() {
                "none offered".to_owned()
            } else {
                preferences
                    .iter()
                    .map(|m| {
                        if m.r#type.is_empty() {
                            "\"\""
                        } else {
                            m.r#type.as_str()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// Fills a KERNEL mechanism's parameters: our netns URL and an interface name.
pub fn fill_kernel(
    m: &mut Mechanism,
    service: &str,
    netns: InodeUrl,
) -> Result<(), MechanismError> {
    match m.interface_name() {
        Some(name) => mech::validate_interface_name(name)?,
        None => m.set_param(keys::NAME, generate_interface_name(service)),
    }
    m.set_param(keys::INODE_URL, netns.to_string());
    Ok(())
}

/// `KERNEL/<name>`, NSM's `server_interface` metric.
pub fn interface_metric(m: &Mechanism) -> String {
    format!("{}/{}", m.r#type, m.interface_name().unwrap_or("unknown"))
}

/// `<service[:10]>-<random>`, 15 bytes, valid as a Linux interface name.
pub fn generate_interface_name(service: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut name: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '/' && c != ':' {
                c
            } else {
                '-'
            }
        })
        .take(LINUX_IF_MAX_LENGTH - 5)
        .collect();
    if name.is_empty() || name == "." || name == ".." {
        name = "nsm".to_owned();
    }
    name.push('-');
    let mut rng = rand::rng();
    while name.len() < LINUX_IF_MAX_LENGTH {
        name.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str) -> Mechanism {
        Mechanism {
            cls: mech::CLS_LOCAL.into(),
            r#type: t.into(),
            ..Default::default()
        }
    }

    #[test]
    fn first_supported_preference_wins() {
        let got = select(None, &[m("MEMIF"), m("KERNEL"), m("VFIO")]).unwrap();
        assert_eq!(got.r#type, "KERNEL");
    }

    #[test]
    fn nothing_supported_names_what_was_offered() {
        let e = select(None, &[m("MEMIF")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot support any of the requested mechanisms: MEMIF (this endpoint supports KERNEL)"
        );
        let e = select(None, &[]).unwrap_err();
        assert!(e.to_string().contains("none offered"), "{e}");
    }

    #[test]
    fn preset_must_be_kernel() {
        assert!(select(Some(&m("KERNEL")), &[m("MEMIF")]).is_ok());
        assert_eq!(
            select(Some(&m("MEMIF")), &[m("KERNEL")]).unwrap_err(),
            MechanismError::Unsupported("MEMIF".into())
        );
    }

    #[test]
    fn kernel_parameters() {
        let url = InodeUrl::new(4, 4026531992);
        let mut k = m("KERNEL");
        fill_kernel(&mut k, "mesh-proxy", url).unwrap();
        let name = k.interface_name().unwrap().to_owned();
        assert!(name.starts_with("mesh-proxy-"), "{name}");
        assert_eq!(name.len(), 15);
        mech::validate_interface_name(&name).unwrap();
        assert_eq!(k.parameters["inodeURL"], "inode://4/4026531992");
        assert_eq!(interface_metric(&k), format!("KERNEL/{name}"));

        let mut named = m("KERNEL");
        named.set_param("name", "foo");
        named.set_param("inodeURL", "file:///proc/thread-self/ns/net");
        fill_kernel(&mut named, "x", url).unwrap();
        assert_eq!(named.parameters["name"], "foo");
        assert_eq!(named.parameters["inodeURL"], "inode://4/4026531992");

        let mut bad = m("KERNEL");
        bad.set_param("name", "much-too-long-name");
        assert!(matches!(
            fill_kernel(&mut bad, "x", url),
            Err(MechanismError::InterfaceName(_))
        ));
    }

    #[test]
    fn generated_names_are_valid_for_any_service() {
        for svc in [
            "",
            "a",
            "icmp-responder",
            "svc@my.cluster3",
            "a/b:c d",
            "ünïcode-service",
            "..",
        ] {
            let n = generate_interface_name(svc);
            assert_eq!(n.len(), 15, "{svc:?} → {n:?}");
            mech::validate_interface_name(&n).unwrap_or_else(|e| panic!("{svc:?} → {n:?}: {e}"));
        }
        assert!(generate_interface_name("icmp-responder").starts_with("icmp-respo-"));
    }
}
