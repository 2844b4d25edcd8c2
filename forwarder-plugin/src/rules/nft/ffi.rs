//! The only unsafe code of the rules module: building libnftnl expressions
//! from plain attribute lists (nftnl 0.9 lacks `redir`, `tproxy` and
//! `ct zone set`, so every expression goes through this one generic builder
//! instead of a mix of crate types and hand-written FFI), and sizing the
//! netlink socket's send buffer (`mnl::Socket` only offers a raw fd).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;

/// One attribute of an expression (`NFTNL_EXPR_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attr {
    U32(u32, u32),
    Bytes(u32, Vec<u8>),
    Str(u32, CString),
}

/// A libnftnl expression described by its name (`"cmp"`, `"meta"`, …) and
/// attributes; see `nft --debug=netlink` for what nft itself generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawExpr {
    pub name: &'static CStr,
    pub attrs: Vec<Attr>,
}

impl nftnl::expr::Expression for RawExpr {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `nftnl_expr_alloc` takes a NUL-terminated name and returns
        // an owned expression or NULL (checked). The setters copy their
        // input (`nftnl_expr_set` memcpy's `len` bytes from a live slice,
        // `nftnl_expr_set_str` strdup's a live C string), so no pointer
        // outlives this call. Ownership of the returned expression passes
        // to the rule (`Rule::add_expr` → `nftnl_rule_add_expr`).
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(self.name.as_ptr())) else {
                // Out of memory for a few bytes: do what std does.
                std::process::abort();
            };
            for attr in &self.attrs {
                match attr {
                    Attr::U32(key, v) => {
                        sys::nftnl_expr_set_u32(expr.as_ptr(), *key as u16, *v);
                    }
                    Attr::Bytes(key, data) => {
                        let _ = sys::nftnl_expr_set(
                            expr.as_ptr(),
                            *key as u16,
                            data.as_ptr().cast::<c_void>(),
                            data.len() as u32,
                        );
                    }
                    Attr::Str(key, s) => {
                        let _ = sys::nftnl_expr_set_str(expr.as_ptr(), *key as u16, s.as_ptr());
                    }
                }
            }
            expr
        }
    }
}

/// Raises `sock`'s send buffer to `bytes`, so a large batch still reaches
/// the kernel in one datagram (as nft does for large rulesets):
/// `SO_SNDBUFFORCE` (needs CAP_NET_ADMIN, as writing rules does), else
/// `SO_SNDBUF` (capped by `net.core.wmem_max`).
pub(crate) fn set_send_buffer(sock: &mnl::Socket, bytes: usize) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor is `sock`'s, open for as long as `sock` is
    // borrowed here, and the borrow does not outlive this call.
    let fd = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    setsockopt(&fd, sockopt::SndBufForce, &bytes)
        .or_else(|_| setsockopt(&fd, sockopt::SndBuf, &bytes))
        .map_err(std::io::Error::from)
}
