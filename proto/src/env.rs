//! NSM's configuration conventions (kelseyhightower/envconfig as NSM's cmds use
//! it): Go booleans, `k:v,k:v` maps, NSM log levels. Shared by every binary so
//! that one value means the same everywhere. Errors are one readable line.

use std::collections::BTreeMap;

/// Go's `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean: use true or false")),
    }
}

/// `NSM_LOG_LEVEL` values (logrus names; FATAL and PANIC log as ERROR).
pub fn parse_log_level(s: &str) -> Result<tracing::Level, String> {
    Ok(match s.trim().to_ascii_uppercase().as_str() {
        "TRACE" => tracing::Level::TRACE,
        "DEBUG" => tracing::Level::DEBUG,
        "INFO" => tracing::Level::INFO,
        "WARN" | "WARNING" => tracing::Level::WARN,
        "ERROR" | "FATAL" | "PANIC" => tracing::Level::ERROR,
        _ => {
            return Err(format!(
                "{s:?} is not a log level: use TRACE, DEBUG, INFO, WARN or ERROR"
            ));
        }
    })
}

/// `k1:v1,k2:v2` (envconfig's map syntax). Empty items are skipped; the value
/// may itself hold ':'; keys must be non-empty and unique; no control characters.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once(':')
            .ok_or_else(|| format!("{:?} is not key:value", pair.trim()))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(format!("{:?} has an empty key", pair.trim()));
        }
        if let Some(c) = k.chars().chain(v.chars()).find(|c| c.is_control()) {
            return Err(format!(
                "{:?} contains control character U+{:04X}",
                pair.trim(),
                c as u32
            ));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("key {k:?} appears twice"));
        }
    }
    Ok(out)
}

/// Labels sdk's `clientinfo` adds from the pod's environment
/// (`POD_NAME` → `podName`, `NODE_NAME` → `nodeName`, `CLUSTER_NAME` →
/// `clusterName`); labels already set win.
pub fn add_client_info(
    labels: &mut BTreeMap<String, String>,
    env: impl Fn(&str) -> Option<String>,
) {
    for (var, key) in [
        ("POD_NAME", "podName"),
        ("NODE_NAME", "nodeName"),
        ("CLUSTER_NAME", "clusterName"),
    ] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            labels.entry(key.to_owned()).or_insert(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_like_go() {
        assert_eq!(parse_bool("T"), Ok(true));
        assert_eq!(parse_bool(" 0 "), Ok(false));
        assert!(parse_bool("yes").is_err());
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("warning"), Ok(tracing::Level::WARN));
        assert_eq!(parse_log_level("FATAL"), Ok(tracing::Level::ERROR));
        assert!(parse_log_level("loud").is_err());
    }

    #[test]
    fn labels() {
        assert!(parse_labels("").unwrap().is_empty());
        let l = parse_labels("a:1, b:x:y ,,").unwrap();
        assert_eq!(l["a"], "1");
        assert_eq!(l["b"], "x:y");
        assert_eq!(parse_labels("app").unwrap_err(), "\"app\" is not key:value");
        assert!(parse_labels(":v").is_err());
        assert!(parse_labels("a:1,a:2").is_err());
        assert!(parse_labels("a:\u{1}").is_err());
    }
}
