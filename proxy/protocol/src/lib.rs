//! The edge's wire formats, free of I/O so they can be fuzzed and reused (HTTP path, WebSocket
//! bridge, tools): the error table ([`error`]), the SSE scanner ([`sse`]), the native chat format
//! ([`chat`]), routing ([`routing`]), the WebSocket messages ([`ws`]) and Prometheus's text
//! format as `moltghost top` reads it ([`prometheus`]).

pub mod chat;
pub mod connect;
pub mod error;
pub mod head;
pub mod keys;
pub mod prometheus;
pub mod routing;
pub mod sse;
pub mod trace;
pub mod usage;
pub mod ws;
