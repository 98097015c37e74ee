//! Admission policy as plain functions over a neutral request view: who is calling
//! (authentication), which agent they reach (routing by host or key scope), and whether they
//! may. The HTTP phases and the WebSocket bridge call the same functions.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::error::EdgeError;
use crate::keys;
use crate::registry::{Account, Agent, AgentState, ApiKey, Registry, Snapshot};
use crate::routing;
use crate::secrets::KeyHasher;

/// What admission looks at, taken from an HTTP request or a WebSocket upgrade.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The `Host` header (or URI authority).
    pub host: &'a str,
    /// The raw `Authorization` header value, if any.
    pub authorization: Option<&'a [u8]>,
    /// A key a browser's WebSocket carried in its subprotocol (`bearer.<key>`), used when
    /// there is no `Authorization` header.
    pub subprotocol_key: Option<&'a str>,
    /// Now, in Unix seconds.
    pub now: i64,
}

/// An admitted caller: the key, the agent it reaches, and the account paying.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The caller's key.
    pub key: Arc<ApiKey>,
    /// The agent.
    pub agent: Arc<Agent>,
    /// The key's account.
    pub account: Arc<Account>,
}

/// Authenticates the caller and finds the agent. Every failure of the key (missing, malformed,
/// unknown, revoked, expired, out of scope) is the same 401, so the answer never says which.
pub fn admit(
    snap: &Snapshot,
    hasher: &KeyHasher,
    agents_domain: &str,
    view: &RequestView<'_>,
) -> Result<Admission, EdgeError> {
    let key = authenticate(snap, hasher, view)?;
    let agent = match routing::endpoint_from_host(view.host, agents_domain) {
        Some(id) => snap
            .agent(&id.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| EdgeError::NotFound("No agent at this endpoint".into()))?,
        // No agent in the Host: a key scoped to exactly one agent names it.
        None => match key.agents.as_slice() {
            [only] => snap.agent(only).cloned().ok_or(EdgeError::InvalidApiKey)?,
            _ => {
                return Err(EdgeError::NotFound(
                    format!("Name the agent in the Host header: <endpoint-id>.{agents_domain}")
                        .into(),
                ))
            }
        },
    };
    if !key.allows(&agent) {
        return Err(EdgeError::InvalidApiKey);
    }
    let account = snap
        .accounts
        .get(&key.account_id)
        .cloned()
        .ok_or(EdgeError::InvalidApiKey)?;
    key.touch(view.now);
    Ok(Admission {
        key,
        agent,
        account,
    })
}

/// The live key presented in `view`.
pub fn authenticate(
    snap: &Snapshot,
    hasher: &KeyHasher,
    view: &RequestView<'_>,
) -> Result<Arc<ApiKey>, EdgeError> {
    let credential = match view.authorization {
        Some(value) => keys::bearer(value),
        None => view.subprotocol_key,
    }
    .ok_or(EdgeError::InvalidApiKey)?;
    let parsed = keys::parse_key(credential).ok_or(EdgeError::InvalidApiKey)?;
    let hash = hasher.hash(credential);
    let key = snap.keys.get(&hash).ok_or(EdgeError::InvalidApiKey)?;
    // The map found it by hash; compare again in constant time, and check the account part.
    let same = key.hash.ct_eq(&hash)
        & key
            .account_id
            .as_bytes()
            .ct_eq(parsed.account_id.as_bytes());
    if !bool::from(same) || key.expires_at.is_some_and(|t| t <= view.now) {
        return Err(EdgeError::InvalidApiKey);
    }
    Ok(key.clone())
}

/// Whether an admitted request may go on in `snap`: its key still live and its agent still
/// running. Open streams re-check this on every change.
pub fn still_admitted(snap: &Snapshot, adm: &Admission) -> Result<(), EdgeError> {
    if !snap.key_ids.contains(&adm.key.id) {
        return Err(EdgeError::InvalidApiKey);
    }
    match snap.agent(&adm.agent.endpoint_id).map(|a| a.state) {
        Some(AgentState::Running) => Ok(()),
        Some(state) => crate::lifecycle::gate(state),
        None => Err(EdgeError::AgentTerminated),
    }
}

/// Watches the registry for changes that end an admitted request (revoked key, paused agent).
pub struct AdmissionWatch {
    registry: Arc<Registry>,
    changes: watch::Receiver<u64>,
    admission: Admission,
}

impl AdmissionWatch {
    /// Watches `admission` against `registry`.
    pub fn new(registry: Arc<Registry>, admission: Admission) -> Self {
        let changes = registry.subscribe();
        Self {
            registry,
            changes,
            admission,
        }
    }

    /// Resolves with the reason once the request may no longer go on; pending until then.
    pub async fn revoked(&mut self) -> EdgeError {
        loop {
            if self.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Err(e) = still_admitted(&self.registry.load(), &self.admission) {
                return e;
            }
        }
    }
}
