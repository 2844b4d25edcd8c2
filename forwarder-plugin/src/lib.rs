//! Kernel dataplane for the mesh-proxy NSE.
