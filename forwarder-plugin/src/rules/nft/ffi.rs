//! The only unsafe code of the rules module: building libnftnl expressions
//! from plain attribute lists (nftnl 0.9 lacks `redir`, `tproxy` and
//! `ct zone set`, so every expression goes through this one generic builder
//! instead of a mix of crate types and hand-written FFI), and a set's user
//! data (nftnl 0.9 has no setter).

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

/// Sets `set`'s user data (`NFTNL_SET_USERDATA`), which the kernel stores
/// for userspace: nft reads the key's byte order from it to print elements.
pub(crate) fn set_userdata<K>(set: &nftnl::set::Set<'_, K>, data: &[u8]) {
    // SAFETY: `set.as_ptr()` is the live `nftnl_set` that `set` owns for the
    // whole call; `nftnl_set_set_data` copies `data.len()` bytes from the
    // live slice, so nothing keeps a pointer into it.
    unsafe {
        let _ = sys::nftnl_set_set_data(
            set.as_ptr().as_ptr(),
            sys::NFTNL_SET_USERDATA as u16,
            data.as_ptr().cast::<c_void>(),
            data.len() as u32,
        );
    }
}
