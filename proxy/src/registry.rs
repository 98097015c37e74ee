//! The in-memory snapshot the hot path serves from: agents, accounts and keys. It is replaced
//! whole on every change ([`Registry::publish`]) and read without locks ([`Registry::load`]), so
//! no request ever waits on the store.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::upstream::Upstream;

/// An agent's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Starting: requests get 202 and `retry-after: 60`.
    Initializing,
    /// Serving.
    Running,
    /// Paused: requests get 503.
    Paused,
    /// Gone for good: requests get 410.
    Terminated,
}

impl AgentState {
    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initializing => "initializing",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Terminated => "terminated",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "initializing" => Ok(Self::Initializing),
            "running" => Ok(Self::Running),
            "paused" => Ok(Self::Paused),
            "terminated" => Ok(Self::Terminated),
            _ => Err(format!(
                "expected initializing, running, paused or terminated, got {s:?}"
            )),
        }
    }
}

/// An agent as the hot path sees it.
#[derive(Debug)]
pub struct Agent {
    /// The host label of its endpoint.
    pub endpoint_id: String,
    /// Its name, unique within the account.
    pub name: String,
    /// The owning account.
    pub account_id: String,
    /// Lifecycle state.
    pub state: AgentState,
    /// How to reach its runtime.
    pub upstream: Upstream,
}

/// One consistent view of everything the edge needs to admit a request.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Agents by endpoint id.
    pub agents: HashMap<String, Arc<Agent>>,
    /// Monotonic version of this view.
    pub generation: u64,
}

impl Snapshot {
    /// The agent at `endpoint_id`.
    pub fn agent(&self, endpoint_id: &str) -> Option<&Arc<Agent>> {
        self.agents.get(endpoint_id)
    }
}

/// The current snapshot plus a signal that fires when it changes (open streams watch it).
pub struct Registry {
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<u64>,
}

impl Registry {
    /// A registry serving `initial`.
    pub fn new(initial: Snapshot) -> Self {
        let (changed, _) = watch::channel(initial.generation);
        Self {
            current: ArcSwap::from_pointee(initial),
            changed,
        }
    }

    /// The current snapshot: a lock-free load.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot and wakes everything watching for changes.
    pub fn publish(&self, next: Snapshot) {
        let generation = next.generation;
        self.current.store(Arc::new(next));
        self.changed.send_replace(generation);
    }

    /// A receiver that sees each new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
