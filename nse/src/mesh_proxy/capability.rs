//! Whether this process may install rules: `CAP_NET_ADMIN` in its
//! effective set (in the user namespace that owns its netns, which is what
//! the kernel checks for nftables and iptables there).

/// `CAP_NET_ADMIN`'s bit (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;

/// Whether capability `bit` is in the effective set (`CapEff` of
/// `/proc/self/status`). Unreadable means no.
pub fn effective(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}
