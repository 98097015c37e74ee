//! The control plane's side of quota leases ([`crate::quota`]): one task per edge process that
//! draws when the request path asks (up to [`DRAWS_AT_ONCE`] accounts at once), and every
//! `limits.lease_ttl / 4` renews the leases in use,
//! gives back those idle for `limits.lease_idle`, and takes back the unused part of leases that
//! other edges stopped renewing two ttl ago (they died, or lost the store). At shutdown it gives
//! back everything requests in flight do not hold, and goes on answering until the process ends.

use std::sync::Arc;
use std::time::Instant;

use pingora_core::server::ShutdownWatch;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use crate::plane::DataPlane;
use crate::quota::month_of;
use crate::store::{self, LeaseOf, Store};

/// Draws in flight at once, each for another account (the quota book asks once per account
/// until answered) and each holding only that account's rows. One at a time, a burst over many
/// accounts queued its draws behind each other past `limits.lease_wait` (FLEET.md).
pub const DRAWS_AT_ONCE: usize = 4;

/// The leasing task of one edge process.
#[derive(Clone)]
pub struct Leasing {
    plane: Arc<DataPlane>,
    store: Store,
    /// This process's name on its leases: the edge id and a suffix of its own, so that the old
    /// and the new process of an upgrade never write each other's lease.
    holder: String,
}

impl Leasing {
    /// The task for `plane`'s quota book, holding leases as edge `edge_id`.
    pub fn new(plane: Arc<DataPlane>, store: Store, edge_id: &str) -> Self {
        let holder = format!("{edge_id}.{}", crate::secrets::short_id(6));
        Self {
            plane,
            store,
            holder,
        }
    }

    /// Answers `asks` (account ids from the quota book) and keeps the leases until the process
    /// ends.
    pub async fn run(self, mut asks: UnboundedReceiver<String>, mut shutdown: ShutdownWatch) {
        let ttl = self.plane.quota.settings().ttl;
        let mut tick = tokio::time::interval(ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        let mut draws = JoinSet::new();
        loop {
            tokio::select! {
                Some(id) = asks.recv(), if draws.len() < DRAWS_AT_ONCE => {
                    let me = self.clone();
                    draws.spawn(async move { me.draw(&id).await });
                }
                Some(_) = draws.join_next() => {}
                _ = tick.tick() => {
                    // Renewals and give-backs write several accounts' rows: never beside a draw.
                    while draws.join_next().await.is_some() {}
                    self.keep(stopping).await;
                }
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    while draws.join_next().await.is_some() {}
                    self.keep(true).await;
                }
            }
        }
    }

    fn count(&self, op: &str, result: &str) {
        self.plane
            .metrics
            .lease_operations
            .with_label_values(&[op, result])
            .inc();
    }

    fn tokens(&self, direction: &str, n: u64) {
        self.plane
            .metrics
            .lease_tokens
            .with_label_values(&[direction])
            .inc_by(n);
    }

    /// Draws for account `id` what its requests need.
    async fn draw(&self, id: &str) {
        let (now, at) = (store::now(), Instant::now());
        let quota = &self.plane.quota;
        let Some(ask) = quota.ask(id, now) else {
            return;
        };
        let of = LeaseOf {
            holder: &self.holder,
            account: id,
            month: &ask.month,
            used: ask.used,
        };
        match self
            .store
            .draw_lease(of, ask.quota, ask.need, ask.want, now)
            .await
        {
            Ok((rows, grant)) => {
                self.count("draw", if rows.left() == 0 { "dry" } else { "ok" });
                self.tokens("drawn", grant);
                quota.drawn(id, &ask.month, rows, at);
            }
            Err(e) => {
                self.count("draw", "error");
                tracing::warn!(account = %id, error = %e, "quota lease draw failed");
                quota.draw_failed(id, &ask.month, at);
            }
        }
    }

    /// Renews the leases in use, gives back the idle ones (every one with `everything`), and
    /// takes back what quiet edges left.
    async fn keep(&self, everything: bool) {
        let (now, at) = (store::now(), Instant::now());
        let quota = &self.plane.quota;
        let month = month_of(now);
        let mut renew = Vec::new();
        for held in quota.held(now, everything) {
            if !held.idle {
                renew.push((held.account, held.used));
                continue;
            }
            let of = LeaseOf {
                holder: &self.holder,
                account: &held.account,
                month: &held.month,
                used: held.used,
            };
            match self.store.give_back_lease(of, held.keep, now).await {
                Ok((rows, back)) => {
                    self.count("give_back", "ok");
                    self.tokens("given_back", back);
                    quota.gave_back(&held.account, &held.month, rows);
                }
                Err(e) => {
                    self.count("give_back", "error");
                    tracing::warn!(account = %held.account, error = %e, "quota lease give-back failed");
                }
            }
        }
        if !renew.is_empty() {
            match self
                .store
                .renew_leases(&self.holder, &month, &renew, now)
                .await
            {
                Ok(lost) => {
                    self.count("renew", "ok");
                    let kept: Vec<String> = renew
                        .into_iter()
                        .map(|(a, _)| a)
                        .filter(|a| !lost.contains(a))
                        .collect();
                    quota.renewed(&month, &kept, &lost, at);
                }
                Err(e) => {
                    self.count("renew", "error");
                    tracing::warn!(error = %e, "quota lease renewal failed; leases lapse a ttl after the last one");
                }
            }
        }
        let ttl = quota.settings().ttl.as_secs() as i64;
        match self.store.reclaim_leases(now - 2 * ttl).await {
            Ok(back) => {
                self.count("reclaim", "ok");
                if back > 0 {
                    self.tokens("reclaimed", back);
                    tracing::info!(tokens = back, "took back the unused leases of quiet edges");
                }
            }
            Err(e) => {
                self.count("reclaim", "error");
                tracing::warn!(error = %e, "quota lease reclaim failed");
            }
        }
    }
}
