//! MoltGhost edge: the access layer for deployed AI agents.
//!
//! A request enters through [`edge`] (the Pingora adapter) and [`http`], or through
//! [`websocket`] (one message at a time), and lives through the [`pipeline`]'s stages: admit →
//! prepare → open → relay → conclude. The request path reads the [`plane`] (the data plane);
//! [`control`] follows the store and publishes into it. Errors from anywhere are one type,
//! [`error::EdgeError`], with one table. ARCHITECTURE.md at the repository's root has the map.

pub use moltghost_common::{identity, init_tracing, logwriter, secrets};
pub use moltghost_protocol::{chat, error, keys, routing, sse, usage, ws};

pub mod access;
pub mod admin;
pub mod body;
pub mod config;
pub mod connections;
pub mod control;
pub mod edge;
pub mod forward;
pub mod http;
pub mod ids;
pub mod leasing;
pub mod ledger;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod plane;
pub mod plugins;
pub mod policy;
pub mod quota;
pub mod registry;
pub mod server;
pub mod store;
pub mod tls;
pub mod traces;
pub mod tunnel;
pub mod upstream;
pub mod websocket;
