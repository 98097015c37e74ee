//! The control plane inside each edge: keeps the snapshot in step with the store, flushes key
//! last-used times, and serves the admin API. It runs beside the request path, never in it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use pingora_core::server::ShutdownWatch;

use crate::config::Config;
use crate::plane::DataPlane;
use crate::registry::{Account, Agent, AgentState, ApiKey, LastUsed, Snapshot};
use crate::store::{self, AccountRow, AgentRow, Contents, Store, StoreError, StoreStatus};
use crate::upstream::{Upstream, UpstreamTarget};

/// Builds the snapshot from the store's contents. Agents whose upstream does not parse, and
/// accounts on a plan the config does not declare, are logged and served as unreachable or
/// refused: one bad row never stops the edge. Tunnels to pods no agent uses are closed, but
/// for `plugin_pods`, those plugins call.
pub fn build_snapshot(
    c: &Contents,
    cfg: &Config,
    last_used: &LastUsed,
    tunnels: &crate::tunnel::bridge::Tunnels,
    plugin_pods: impl Iterator<Item = String>,
) -> Snapshot {
    let settings = cfg.peer_settings();
    let accounts: HashMap<String, Arc<Account>> = c
        .accounts
        .iter()
        .filter_map(|a| {
            let Some(plan) = cfg.plan(&a.plan) else {
                tracing::error!(account = %a.id, plan = %a.plan, "account on an undeclared plan: its keys are refused");
                return None;
            };
            Some((a.id.clone(), Arc::new(Account { id: a.id.clone(), name: a.name.clone(), plan: plan.clone() })))
        })
        .collect();
    let agents: HashMap<String, Arc<Agent>> = c
        .agents
        .iter()
        .map(|a| {
            let state = a.state.parse().unwrap_or(AgentState::Paused);
            let target = UpstreamTarget::parse(&a.upstream).unwrap_or_else(|e| {
                tracing::error!(agent = %a.endpoint_id, error = %e, "bad upstream");
                UpstreamTarget::Http {
                    host: "invalid.".into(),
                    port: 9,
                    base_path: String::new(),
                }
            });
            let agent = Agent {
                endpoint_id: a.endpoint_id.clone(),
                name: a.name.clone(),
                account_id: a.account_id.clone(),
                state,
                upstream: Upstream::resolve(target, settings, tunnels),
            };
            (a.endpoint_id.clone(), Arc::new(agent))
        })
        .collect();
    tunnels.retain(
        &agents
            .values()
            .filter_map(|a: &Arc<Agent>| a.upstream.tunnel().map(|t| t.id.clone()))
            .chain(plugin_pods)
            .collect(),
    );
    let mut keys = HashMap::with_capacity(c.keys.len());
    let mut key_ids = HashSet::with_capacity(c.keys.len());
    for k in &c.keys {
        let Some(hash) = hex::decode(&k.hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
        else {
            tracing::error!(key = %k.id, "key with a malformed hash: ignored");
            continue;
        };
        key_ids.insert(k.id.clone());
        let key = ApiKey {
            id: k.id.clone(),
            account_id: k.account_id.clone(),
            name: k.name.clone(),
            hash,
            agents: k.agents.clone(),
            expires_at: k.expires_at,
            last_used: last_used.slot(&k.id, k.last_used_at.unwrap_or(0)),
        };
        keys.insert(hash, Arc::new(key));
    }
    Snapshot {
        agents,
        accounts,
        keys,
        key_ids,
        generation: c.revision as u64,
    }
}

/// Creates what the config declares and the store lacks: the accounts of declared agents, the
/// agents themselves, and a `default` account when there is none. Idempotent, also when edges
/// of a fleet declare the same rows at the same moment ([`Store::declare`]).
pub async fn seed(store: &Store, cfg: &Config) -> Result<(), StoreError> {
    let accounts = store.accounts().await?;
    let known = |name: &str| accounts.iter().any(|a| a.name == name || a.id == name);
    let mut wanted: Vec<&str> = cfg.agents.iter().map(|a| a.account.as_str()).collect();
    if accounts.is_empty() {
        wanted.push("default");
    }
    wanted.sort_unstable();
    wanted.dedup();
    let now = store::now();
    let new_accounts: Vec<AccountRow> = wanted
        .into_iter()
        .filter(|name| !known(name))
        .map(|name| AccountRow {
            id: if moltghost_protocol::keys::is_account_id(name) {
                name.to_owned()
            } else {
                crate::secrets::short_id(8)
            },
            name: name.to_owned(),
            plan: cfg.plans[0].name.clone(),
            created_at: now,
        })
        .collect();
    let agents = store.agents().await?;
    let new_agents: Vec<(AgentRow, String)> = cfg
        .agents
        .iter()
        .filter(|a| !agents.iter().any(|b| b.endpoint_id == a.endpoint_id))
        .map(|a| {
            let row = AgentRow {
                endpoint_id: a.endpoint_id.clone(),
                name: a.name.clone(),
                account_id: String::new(),
                upstream: a.upstream.to_string(),
                state: a.state.as_str().into(),
                created_at: now,
                updated_at: now,
            };
            (row, a.account.clone())
        })
        .collect();
    if new_accounts.is_empty() && new_agents.is_empty() {
        return Ok(());
    }
    store.declare(new_accounts, new_agents).await
}

/// The control plane's state: what it needs to follow the store and reload, and the data
/// plane it publishes into.
pub struct Control {
    /// What the request path reads; the control plane publishes into it.
    pub plane: Arc<DataPlane>,
    /// The file the config came from (`None`: the embedded default, nothing to reload).
    pub config_path: Option<std::path::PathBuf>,
    /// Key last-used slots (shared with the snapshot's keys).
    pub last_used: Arc<LastUsed>,
    /// Admin JWT secret.
    pub admin_secret: String,
    /// Serializes reloads, so an older snapshot never replaces a newer one.
    pub reload: tokio::sync::Mutex<()>,
    /// WireGuard tunnels to pods.
    pub tunnels: Arc<crate::tunnel::bridge::Tunnels>,
    /// TLS certificates, when the edge terminates TLS.
    pub certs: Option<Arc<crate::tls::CertResolver>>,
    /// The quota book's requests for draws, until [`Control::follow`] hands them to the
    /// leasing task.
    pub lease_asks: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// The span exporter (`[traces]`), until the control plane starts it.
    pub span_exporter: std::sync::Mutex<Option<crate::traces::Exporter>>,
}

impl Control {
    /// The config in force.
    pub fn cfg(&self) -> Arc<Config> {
        self.plane.config.load_full()
    }

    /// The store link's health.
    pub fn status(&self) -> &StoreStatus {
        &self.plane.store_status
    }

    /// Re-reads the config file and puts it in force: plans, agents domain, limits, timeouts,
    /// upstream settings, plugins, declared agents and certificates. What is in
    /// [`crate::config::Fixed`] changes only with a restart or an upgrade; a file that asks to
    /// change it, or that does not validate, is refused and the running config stays.
    pub async fn reload(&self, store: &Store) -> Result<String, String> {
        let path = self
            .config_path
            .as_deref()
            .ok_or("the edge runs on the embedded default config: there is no file to reload")?;
        let next = Config::load(Some(path)).map_err(|e| e.0)?;
        let cur = self.cfg();
        if let Some(key) = cur.restart_only_change(&next) {
            return Err(format!(
                "`{key}` changes only with a restart or an upgrade; nothing was reloaded"
            ));
        }
        // Plugins are compiled and started before anything changes (their files are read
        // again, so a rebuilt plugin is picked up); requests already running keep the set
        // they started with.
        let plugins = if next.plugins.is_empty() && cur.plugins.is_empty() {
            None
        } else {
            let configs = next.plugins.clone();
            let reach = crate::plugins::Reach {
                node: Arc::new(next.node(&self.plane.ledger.edge_id)),
                pods: Some((self.tunnels.clone(), self.plane.identity.clone())),
            };
            Some(
                tokio::task::spawn_blocking(move || {
                    crate::plugins::PluginSet::load(&configs, &reach)
                })
                .await
                .map_err(|e| e.to_string())??,
            )
        };
        if let (Some(certs), Some(tls)) = (&self.certs, &next.tls) {
            certs.replace(tls.certificates.clone())?;
        }
        if let Some(p) = plugins {
            self.plane.plugins.store(Arc::new(p));
        }
        self.plane.config.store(Arc::new(next));
        let cfg = self.cfg();
        seed(store, &cfg).await.map_err(|e| e.to_string())?;
        self.refresh_forced(store)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(format!("reloaded {}", path.display()))
    }

    /// Rebuilds the snapshot even if the store did not move (the config did).
    async fn refresh_forced(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reload.lock().await;
        let contents = store.contents().await?;
        self.plane.registry.publish(build_snapshot(
            &contents,
            &self.cfg(),
            &self.last_used,
            &self.tunnels,
            self.plane.plugins.load().pod_tunnels(),
        ));
        Ok(())
    }

    /// Follows the store and the process's signals until shutdown: the snapshot, key last-used
    /// times, the fleet's figures, quota leases, certificates, SIGHUP reloads, and the drain
    /// signal.
    pub async fn follow(self: Arc<Self>, store: Store, shutdown: ShutdownWatch) {
        if let Some(asks) = take_once(&self.lease_asks) {
            let leasing = crate::leasing::Leasing::new(
                self.plane.clone(),
                store.clone(),
                &self.plane.ledger.edge_id,
            );
            // Not joined: it answers draws until the process ends, past the drain.
            tokio::spawn(leasing.run(asks, shutdown.clone()));
        }
        let _ = tokio::join!(
            tokio::spawn(self.clone().watch(store.clone(), shutdown.clone())),
            tokio::spawn(self.clone().flush(store.clone(), shutdown.clone())),
            tokio::spawn(self.clone().sync_fleet(store.clone(), shutdown.clone())),
            tokio::spawn(self.clone().watch_certs(shutdown.clone())),
            tokio::spawn(self.clone().on_sighup(store, shutdown.clone())),
            tokio::spawn(self.on_shutdown(shutdown)),
        );
    }

    /// Reloads on SIGHUP.
    async fn on_sighup(self: Arc<Self>, store: Store, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if let Err(e) = self.reload(&store).await {
                        tracing::error!(error = %e, "configuration reload refused");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Reloads the snapshot if the store moved past it. The admin API calls this after each
    /// change, so a change made through an edge is in force there when the call returns.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reload.lock().await;
        let revision = store.revision().await?;
        if revision as u64 != self.plane.registry.load().generation {
            let contents = store.contents().await?;
            let plugins = self.plane.plugins.load();
            let next = build_snapshot(
                &contents,
                &self.cfg(),
                &self.last_used,
                &self.tunnels,
                plugins.pod_tunnels(),
            );
            tracing::debug!(generation = next.generation, "snapshot reloaded");
            self.plane.registry.publish(next);
        }
        self.status().ok();
        Ok(())
    }

    /// Follows the store: on every notification or poll tick, reload if needed.
    async fn watch(self: Arc<Self>, store: Store, mut shutdown: ShutdownWatch) {
        let mut listener: Option<sqlx::postgres::PgListener> = None;
        let mut tick = tokio::time::interval(self.cfg().fixed.store.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if store.is_postgres() && listener.is_none() {
                listener = connect_listener(store.session_url()).await;
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()).map_err(|e| e.to_string()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = notified => if let Err(e) = r {
                    tracing::warn!(error = %e, "change notifications lost; reconnecting");
                    listener = None;
                },
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.refresh(&store).await {
                self.status().failed(&e);
            }
        }
    }

    /// Every `limits.fleet_sync`: ships the usage journal into the store, tells the fleet this
    /// edge's key rates and learns the others'. Runs once more at shutdown, so what was
    /// journaled is shipped. (Quotas are kept by leases: [`crate::leasing`].)
    async fn sync_fleet(self: Arc<Self>, store: Store, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.cfg().fixed.limits.fleet_sync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.changed() => true,
            };
            if let Err(e) = self.sync_once(&store).await {
                tracing::warn!(error = %e, "fleet sync failed; limits hold with what this edge knows");
            }
            if stop {
                return;
            }
        }
    }

    /// One round of [`Control::sync_fleet`].
    pub async fn sync_once(&self, store: &Store) -> Result<(), StoreError> {
        let recovered = self.plane.ledger.recover(store).await;
        self.plane
            .metrics
            .journal_writable
            .set(i64::from(self.plane.ledger.is_writable()));
        recovered?;
        self.plane.ledger.journal.ship(store).await?;
        // A process this one replaced (an upgrade) or that crashed leaves its journal behind.
        crate::ledger::Journal::ship_orphans(&self.cfg().fixed.edge.data_dir, store).await?;
        let now = store::now();
        let rates: Vec<(String, u64)> = self
            .last_used
            .active_since(now - 120)
            .into_iter()
            .map(|id| {
                let n = self.plane.limiter.local_count(&id);
                (id, n)
            })
            .collect();
        let fresh = (self.cfg().fixed.limits.fleet_sync.as_secs() as i64 * 4).max(3);
        let fleet = store
            .exchange_fleet_state(&self.plane.ledger.edge_id, &rates, now, fresh)
            .await?;
        self.plane
            .limiter
            .set_remote(fleet.rates.into_iter().collect());
        Ok(())
    }

    /// Reloads TLS certificates whose files changed, every `tls.reload_interval`.
    async fn watch_certs(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        let Some(certs) = self.certs.clone() else {
            return;
        };
        let interval = self
            .cfg()
            .tls
            .as_ref()
            .map_or(std::time::Duration::from_secs(10), |t| t.reload_interval);
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            match certs.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificates reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificates changed but do not load; still serving the previous ones")
                }
            }
        }
    }

    /// Says "draining" to whoever watches [`Control::draining`] once shutdown begins.
    async fn on_shutdown(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        self.plane.draining.send_replace(true);
    }

    /// Writes key last-used times every `last_used_flush`, and once more at shutdown.
    async fn flush(self: Arc<Self>, store: Store, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.cfg().fixed.store.last_used_flush);
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.changed() => true,
            };
            let dirty = self.last_used.take_dirty();
            if let Err(e) = store.touch_keys(&dirty).await {
                tracing::warn!(error = %e, keys = dirty.len(), "could not record key last-used times");
            }
            if stop {
                return;
            }
        }
    }
}

/// What a `Control` holds until the task that owns it starts (the lease asks, the span
/// exporter): taken once.
pub(crate) fn take_once<T>(slot: &std::sync::Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

async fn connect_listener(url: &str) -> Option<sqlx::postgres::PgListener> {
    let mut l = sqlx::postgres::PgListener::connect(url).await.ok()?;
    l.listen(store::CHANNEL).await.ok()?;
    Some(l)
}
