//! One netlink handle per namespace the hop's connections END in: every
//! connection to an endpoint ends in that endpoint's namespace, so opening
//! a socket there (a thread that enters the namespace) for each of them is
//! work done over and over. Established connections hold the handle; when
//! the last of a namespace's connections is gone, so is its socket (and the
//! namespace is no longer kept alive by it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::link::{Links, Result};
use crate::netns::{Netns, NetnsId};

#[derive(Debug, Default)]
pub(crate) struct LinksCache {
    /// Weak: the cache alone never keeps a socket (or a namespace) open.
    /// Keyed by identity, which stays unique while a handle is alive,
    /// because the handle holds the namespace.
    map: Mutex<HashMap<NetnsId, Weak<Links>>>,
}

impl LinksCache {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<NetnsId, Weak<Links>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle for `ns`: the one in use, else a new one. Needs a tokio runtime.
    pub fn get(&self, ns: &Netns) -> Result<Arc<Links>> {
        if let Some(links) = self.map().get(&ns.id()).and_then(Weak::upgrade) {
            return Ok(links);
        }
        // Opened outside the lock: it takes a thread; a racing opener's
        // handle wins and ours is dropped.
        let links = Arc::new(Links::open(ns)?);
        let mut map = self.map();
        if let Some(theirs) = map.get(&ns.id()).and_then(Weak::upgrade) {
            return Ok(theirs);
        }
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(ns.id(), Arc::downgrade(&links));
        Ok(links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shared_while_held_and_gone_after() {
        let cache = LinksCache::default();
        let ns = Netns::current().unwrap();
        let a = cache.get(&ns).unwrap();
        let b = cache.get(&ns).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one handle per namespace while held");
        drop((a, b));
        let c = cache.get(&ns).unwrap();
        assert_eq!(
            Arc::strong_count(&c),
            1,
            "a fresh handle once nobody held the old one"
        );
        assert_eq!(cache.map().len(), 1);
    }
}
