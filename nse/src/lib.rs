//! The mesh-proxy network service endpoint.
