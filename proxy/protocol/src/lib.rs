//! The edge's wire formats, free of I/O so they can be fuzzed and reused (HTTP path, WebSocket
//! bridge, tools): the error table ([`error`]), the SSE scanner ([`sse`]), the native chat format
//! ([`chat`]), routing ([`routing`]) and the WebSocket messages ([`ws`]).

pub mod chat;
pub mod connect;
pub mod error;
pub mod head;
pub mod keys;
pub mod routing;
pub mod sse;
pub mod usage;
pub mod ws;
