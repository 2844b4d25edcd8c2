//! Memory given back once connections end. glibc's allocator keeps the
//! pages that connection state freed (in per-thread arenas, below live
//! allocations), so after a crowd of connections closes a process would
//! keep its peak RSS for good — 61 MiB after 5,000 connections, measured.
//! [`Trim`] asks the allocator to return free pages when the live count
//! has fallen far from its peak: never on the request path, at most once
//! per call of [`Trim::after`] (the callers' upkeep period).

/// Connections gone since the last trim that make the next one worth it.
const WORTH: usize = 256;

/// Decides when to trim from the number of live connections.
#[derive(Debug, Default)]
pub struct Trim {
    /// Most connections live since the last trim.
    peak: usize,
    /// Calls left before the follow-up trim, if one is due.
    again_in: Option<u32>,
}

/// Calls between a trim and its follow-up: the threads a crowd made idle
/// away meanwhile (the runtime's keep-alive), handing the chunks they
/// cached back to their arenas, which only a trim then returns.
const AGAIN_AFTER: u32 = 3;

impl Trim {
    /// With `live` connections now: trims if all are gone since the peak,
    /// or at least [`WORTH`] of them, and once more [`AGAIN_AFTER`] calls
    /// later. Returns whether it trimmed.
    pub fn after(&mut self, live: usize) -> bool {
        self.peak = self.peak.max(live);
        let gone = self.peak - live;
        if gone == 0 || (live > 0 && gone < WORTH) {
            return match self.again_in.as_mut() {
                Some(0) => {
                    self.again_in = None;
                    trim();
                    true
                }
                Some(n) => {
                    *n -= 1;
                    false
                }
                None => false,
            };
        }
        self.peak = live;
        self.again_in = Some(AGAIN_AFTER - 1);
        trim();
        true
    }
}

/// Returns the allocator's free pages to the kernel (glibc: `malloc_trim`,
/// which also releases whole free pages inside its arenas).
#[allow(unsafe_code)]
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_trims_when_connections_have_gone_not_while_they_come() {
        let mut t = Trim::default();
        let quiet = |t: &mut Trim, live: usize, n: u32| {
            (0..n).map(|_| t.after(live)).filter(|x| *x).count()
        };
        assert!(!t.after(0), "nothing ever live");
        assert!(!t.after(10));
        assert!(!t.after(1000), "growing");
        assert!(!t.after(900), "100 gone: not yet worth it");
        assert!(t.after(700), "300 gone");
        assert_eq!(quiet(&mut t, 700, AGAIN_AFTER), 1, "and once more, later");
        assert_eq!(quiet(&mut t, 700, 10), 0, "nothing more gone since");
        assert!(!t.after(600));
        assert!(t.after(0), "all gone");
        assert_eq!(quiet(&mut t, 0, 10), 1);
        assert!(!t.after(1));
        assert!(t.after(0), "a single connection, all gone");
    }
}
