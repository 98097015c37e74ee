//! MoltGhost edge: the access layer for deployed AI agents.
//!
//! A request passes through these modules in order (see [`edge`] for the Pingora phases):
//! [`config`] → [`routing`] → [`lifecycle`] → [`body`] → [`chat`] (native translation) →
//! [`forward`] (upstream exchange over [`upstream`]) → [`response`] and [`sse`] → [`logging`].
//! Errors from any of them are one type, [`error::EdgeError`].

pub use moltghost_protocol::{chat, error, keys, routing, sse, usage, ws};

pub mod admin;
pub mod body;
pub mod config;
pub mod control;
pub mod edge;
pub mod forward;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod logwriter;
pub mod metering;
pub mod metrics;
pub mod plugins;
pub mod pod;
pub mod policy;
pub mod quota;
pub mod registry;
pub mod response;
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
