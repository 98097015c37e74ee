//! The in-memory snapshot the hot path serves from: agents, accounts and keys. It is replaced
//! whole on every change ([`Registry::publish`]) and read without locks ([`Registry::load`]), so
//! no request ever waits on the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Plan;
pub use crate::lifecycle::AgentState;
use crate::upstream::Upstream;

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

/// An account as the hot path sees it.
#[derive(Debug)]
pub struct Account {
    /// Id (the middle part of its keys).
    pub id: String,
    /// Name.
    pub name: String,
    /// Its plan, resolved from config.
    pub plan: Plan,
}

/// A live (not revoked) API key as the hot path sees it. The key itself is not here: only its
/// hash, as the map key of [`Snapshot::keys`].
#[derive(Debug)]
pub struct ApiKey {
    /// Key id, safe to log.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// Name.
    pub name: String,
    /// The hash, compared again in constant time after the map lookup.
    pub hash: [u8; 32],
    /// Endpoint ids in scope; empty means every agent of the account.
    pub agents: Vec<String>,
    /// Expiry (Unix seconds).
    pub expires_at: Option<i64>,
    /// Last use (Unix seconds), shared across snapshots and flushed in batches.
    pub last_used: Arc<AtomicI64>,
}

impl ApiKey {
    /// Whether the key may call `agent`.
    pub fn allows(&self, agent: &Agent) -> bool {
        agent.account_id == self.account_id
            && (self.agents.is_empty() || self.agents.contains(&agent.endpoint_id))
    }

    /// Records a use at `now` (a store only when the second changes, to keep the line quiet).
    pub fn touch(&self, now: i64) {
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }
}

/// One consistent view of everything the edge needs to admit a request.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Agents by endpoint id.
    pub agents: HashMap<String, Arc<Agent>>,
    /// Accounts by id.
    pub accounts: HashMap<String, Arc<Account>>,
    /// Live keys by the HMAC of the key.
    pub keys: HashMap<[u8; 32], Arc<ApiKey>>,
    /// Ids of the live keys (open streams re-check theirs on every change).
    pub key_ids: HashSet<String>,
    /// Monotonic version of this view (the store's revision).
    pub generation: u64,
}

impl Snapshot {
    /// The agent at `endpoint_id`.
    pub fn agent(&self, endpoint_id: &str) -> Option<&Arc<Agent>> {
        self.agents.get(endpoint_id)
    }
}

/// Last-used times of keys, kept across snapshots so the hot path can write them without the
/// store, and the control plane can flush them in batches.
#[derive(Debug, Default)]
pub struct LastUsed {
    slots: Mutex<HashMap<String, (Arc<AtomicI64>, i64)>>,
}

impl LastUsed {
    /// The slot for key `id`, created at `stored` (the store's value).
    pub fn slot(&self, id: &str, stored: i64) -> Arc<AtomicI64> {
        let mut slots = self.slots.lock().expect("last-used lock");
        slots
            .entry(id.to_owned())
            .or_insert_with(|| (Arc::new(AtomicI64::new(stored)), stored))
            .0
            .clone()
    }

    /// Ids of the keys used at or after `since` (Unix seconds).
    pub fn active_since(&self, since: i64) -> Vec<String> {
        let slots = self.slots.lock().expect("last-used lock");
        slots
            .iter()
            .filter(|(_, (slot, _))| slot.load(Ordering::Relaxed) >= since)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The uses since the last call, to write.
    pub fn take_dirty(&self) -> Vec<(String, i64)> {
        let mut slots = self.slots.lock().expect("last-used lock");
        let mut dirty = Vec::new();
        for (id, (slot, flushed)) in slots.iter_mut() {
            let v = slot.load(Ordering::Relaxed);
            if v > *flushed {
                *flushed = v;
                dirty.push((id.clone(), v));
            }
        }
        dirty
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

    /// Replaces the snapshot and wakes everything watching for changes. Callers serialize
    /// publishing (the control plane's reload lock).
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
