//! WireGuard upstreams: the tunnel itself is the `moltghost-tunnel` crate (an I/O-free core and
//! its device layer, shared with the pod sidecar); the edge's side of it lives here.
//!
//! - [`bridge`]: a tunnel per pod and the in-process Unix-socket CONNECT bridge through which
//!   Pingora's pooled connector reaches them.

pub mod bridge;

pub use moltghost_tunnel::*;
