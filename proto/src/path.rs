//! Path helpers mirroring the NSM api's connection helpers: segments around the
//! path index, timestamps, and monitor-selector matching.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

use crate::connection::{Connection, MonitorScopeSelector, PathSegment};

/// Navigation around `path.index`.
pub trait ConnectionExt {
    fn segments(&self) -> &[PathSegment];
    fn index(&self) -> usize;
    /// `path_segments[index - 1]`.
    fn prev_segment(&self) -> Option<&PathSegment>;
    /// `path_segments[index]`.
    fn current_segment(&self) -> Option<&PathSegment>;
    /// `path_segments[index + 1]`.
    fn next_segment(&self) -> Option<&PathSegment>;
}

impl ConnectionExt for Connection {
    fn segments(&self) -> &[PathSegment] {
        self.path
            .as_ref()
            .map(|p| p.path_segments.as_slice())
            .unwrap_or(&[])
    }

    fn index(&self) -> usize {
        self.path.as_ref().map(|p| p.index as usize).unwrap_or(0)
    }

    fn prev_segment(&self) -> Option<&PathSegment> {
        let i = self.index();
        i.checked_sub(1).and_then(|p| self.segments().get(p))
    }

    fn current_segment(&self) -> Option<&PathSegment> {
        self.segments().get(self.index())
    }

    fn next_segment(&self) -> Option<&PathSegment> {
        self.segments().get(self.index() + 1)
    }
}

/// `SystemTime` → protobuf `Timestamp`.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Protobuf `Timestamp` → `SystemTime` (`None` for pre-epoch or malformed values).
pub fn from_timestamp(ts: &Timestamp) -> Option<SystemTime> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(ts.seconds as u64, ts.nanos as u32))
}

fn segment_matches(want: &PathSegment, have: &PathSegment) -> bool {
    let field = |w: &str, h: &str| w.is_empty() || w == h;
    field(&want.name, &have.name) && field(&want.id, &have.id) && field(&want.token, &have.token)
}

/// Whether a monitor selector matches a connection: an empty selector matches
/// everything; `network_services` filters by service; the selector's segments
/// must appear as a contiguous run of the path, empty fields being wildcards.
pub fn selector_matches(sel: &MonitorScopeSelector, conn: &Connection) -> bool {
    if !sel.network_services.is_empty() && !sel.network_services.contains(&conn.network_service) {
        return false;
    }
    let want = &sel.path_segments;
    if want.is_empty() {
        return true;
    }
    let have = conn.segments();
    have.windows(want.len())
        .any(|w| w.iter().zip(want).all(|(h, s)| segment_matches(s, h)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Path;

    fn seg(name: &str, id: &str) -> PathSegment {
        PathSegment {
            name: name.into(),
            id: id.into(),
            ..Default::default()
        }
    }

    fn conn() -> Connection {
        Connection {
            id: "f2".into(),
            network_service: "mesh-proxy".into(),
            path: Some(Path {
                index: 2,
                path_segments: vec![
                    seg("nsc", "c0"),
                    seg("nsmgr", "m1"),
                    seg("fwd", "f2"),
                    seg("nse", "n3"),
                ],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn navigates() {
        let c = conn();
        assert_eq!(c.prev_segment().unwrap().id, "m1");
        assert_eq!(c.current_segment().unwrap().id, "f2");
        assert_eq!(c.next_segment().unwrap().id, "n3");
    }

    #[test]
    fn selectors() {
        let c = conn();
        assert!(selector_matches(&MonitorScopeSelector::default(), &c));
        let by_fwd = MonitorScopeSelector {
            path_segments: vec![seg("fwd", "f2")],
            ..Default::default()
        };
        assert!(selector_matches(&by_fwd, &c));
        let wildcard_run = MonitorScopeSelector {
            path_segments: vec![seg("", "f2"), seg("nse", "")],
            ..Default::default()
        };
        assert!(selector_matches(&wildcard_run, &c));
        let other = MonitorScopeSelector {
            path_segments: vec![seg("fwd", "zz")],
            ..Default::default()
        };
        assert!(!selector_matches(&other, &c));
        let svc = MonitorScopeSelector {
            network_services: vec!["other".into()],
            ..Default::default()
        };
        assert!(!selector_matches(&svc, &c));
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(from_timestamp(&to_timestamp(t)), Some(t));
        assert_eq!(
            from_timestamp(&Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
    }
}
