//! The endpoint's own chain elements: [`service`] first (turns away
//! services we do not provide), then after NSM's generic ones
//! ([`nsm_api::chain`]: updatepath, begin, updatetoken, timeout, monitor,
//! trimpath) the KERNEL [`mechanism`], point-to-point [`ipam`], and the
//! network-[`functions`] slot. They run with [`NseError`](crate::NseError)
//! as the chain's error type.

pub mod functions;
pub mod ipam;
pub mod mechanism;
pub mod service;
