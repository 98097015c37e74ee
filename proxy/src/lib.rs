//! MoltGhost edge: the access layer for deployed AI agents.
//!
//! A request enters through [`edge`] (the Pingora adapter) and [`http`], or through
//! [`websocket`] (one message at a time), and lives through the [`pipeline`]'s stages: admit →
//! prepare → open → relay → conclude. The request path reads the [`plane`] (the data plane);
//! [`control`] follows the store and publishes into it. Errors from anywhere are one type,
//! [`error::EdgeError`], with one table. ARCHITECTURE.md at the repository's root has the map.

pub use moltghost_protocol::{chat, error, keys, routing, sse, usage, ws};

pub mod access;
pub mod admin;
pub mod body;
pub mod config;
pub mod control;
pub mod edge;
pub mod forward;
pub mod http;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod lifecycle;
pub mod limits;
pub mod logwriter;
pub mod metrics;
pub mod pipeline;
pub mod plane;
pub mod plugins;
pub mod pod;
pub mod policy;
pub mod quota;
pub mod registry;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod websocket;

/// Sets up `tracing`: JSON lines on stdout, filtered by `RUST_LOG` (default `info`), buffered
/// off the request path ([`logwriter`]). Keep the guard for the life of the process: dropping
/// it writes out what is left.
pub fn init_tracing() -> logwriter::FlushGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,pingora=warn".into());
    let (writer, guard) = logwriter::stdout();
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_writer(writer)
        .try_init();
    guard
}
