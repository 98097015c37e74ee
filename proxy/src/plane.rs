//! The data plane: everything the request path reads, and nothing it would have to wait for.
//!
//! The control plane ([`crate::control`]) builds this once at start and then only *publishes*
//! into it: a new snapshot into [`DataPlane::registry`], a reloaded config or plugin set by
//! swapping an `Arc`, the fleet's figures into the limiter and the quota book, `true` into
//! [`DataPlane::draining`]. The request path ([`crate::pipeline`], [`crate::websocket`]) holds an
//! `Arc<DataPlane>` and never sees the store, the admin API or the reload machinery.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::identity::IdentityKey;
use crate::ledger::Ledger;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::plugins::PluginSet;
use crate::quota::QuotaBook;
use crate::registry::Registry;
use crate::secrets::KeyHasher;
use crate::store::StoreStatus;

/// What a request reads while it is served.
pub struct DataPlane {
    /// The config in force (a reload swaps it between requests).
    pub config: ArcSwap<Config>,
    /// The snapshot of agents, accounts and keys.
    pub registry: Arc<Registry>,
    /// The API-key hasher (HMAC-SHA-256 with the server secret).
    pub hasher: KeyHasher,
    /// Request-rate and concurrent-stream limits.
    pub limiter: Limiter,
    /// Token quotas: reservations at admission, settlement at the end.
    pub quota: QuotaBook,
    /// The durable usage journal.
    pub ledger: Arc<Ledger>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Signs the caller identity pods check.
    pub identity: Arc<IdentityKey>,
    /// The WASM policy plugins in force.
    pub plugins: ArcSwap<PluginSet>,
    /// The store link's health, as `/v1/health` reports it.
    pub store_status: Arc<StoreStatus>,
    /// Request spans for the OTLP exporter (`[traces]`), when it is on.
    pub spans: Option<crate::traces::Spans>,
    /// True once the process drains (an upgrade or a stop): long-lived connections
    /// (WebSockets) finish what they are doing and close, without each polling for it.
    pub draining: tokio::sync::watch::Sender<bool>,
}

impl DataPlane {
    /// The config in force.
    pub fn cfg(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }
}
