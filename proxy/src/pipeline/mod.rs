//! The request path as a request lives it, shared by HTTP ([`crate::http`]) and by each
//! message of a WebSocket ([`crate::websocket`]):
//!
//! | stage | module | what |
//! |---|---|---|
//! | admit | [`admit`] | key, agent, lifecycle ([`crate::policy`], pure), request rate |
//! | prepare | [`prepare`] | request-side plugins, translation to the runtime's request, deadline, cost |
//! | open | [`open`] | caller identity, stream cap, quota reservation ([`accounting`]), upstream exchange |
//! | relay | [`relay`] | the runtime's answer to the client: [`relay::passthrough`], [`relay::sse`], [`relay::native`] |
//! | conclude | [`conclude`] | upstream connection back to the pool, usage settled once, access log, metrics |
//!
//! Writing to an HTTP client (status, headers, error bodies, response-side plugins, first-token
//! timing) is the [`respond::Responder`]'s job; the WebSocket bridge writes frames itself but
//! filters them through the same [`RequestCtx`] methods.

pub mod accounting;
pub mod admit;
pub mod conclude;
mod ctx;
mod downstream;
pub mod open;
pub mod prepare;
pub mod relay;
pub mod respond;

use std::sync::Arc;

pub use ctx::RequestCtx;
pub use downstream::{client_addr, is_tls, server_addr, tls_version, ClientConnection, Downstream};

use crate::config::Config;
use crate::forward::Forwarder;
use crate::ids::RequestIds;
use crate::plane::DataPlane;

/// The request path's own state: the data plane it reads, the upstream connector with its pool,
/// and the request-id source.
pub struct Pipeline {
    /// What requests read: snapshot, limits, quotas, ledger, plugins, metrics, identity.
    pub plane: Arc<DataPlane>,
    pub(crate) forwarder: Forwarder,
    /// Makes request ids.
    pub ids: RequestIds,
}

impl Pipeline {
    /// A pipeline reading `plane`.
    pub fn new(plane: Arc<DataPlane>) -> Self {
        Self {
            plane,
            forwarder: Forwarder::new(1024),
            ids: RequestIds::default(),
        }
    }

    /// The config in force (a reload replaces it between requests).
    pub fn cfg(&self) -> arc_swap::Guard<Arc<Config>> {
        self.plane.cfg()
    }

    /// Whether any policy plugin is loaded.
    pub fn has_plugins(&self) -> bool {
        !self.plane.plugins.load().plugins().is_empty()
    }
}
