//! The endpoint's own chain elements, after NSM's generic ones
//! ([`nsm_api::chain`]: updatepath, begin, updatetoken, timeout, monitor,
//! trimpath): the KERNEL [`mechanism`], point-to-point [`ipam`], and the
//! network-[`functions`] slot. They run with [`NseError`](crate::NseError)
//! as the chain's error type.

pub mod functions;
pub mod ipam;
pub mod mechanism;
