//! The edge's link to the store as the request path sees it: healthy or not, and since when.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use super::{now, StoreError};

/// Health of the edge's link to the store, for `/v1/health`, the admin API and the log.
#[derive(Debug, Default)]
pub struct StoreStatus {
    healthy: AtomicBool,
    /// Unix seconds of the last successful contact.
    last_ok: AtomicI64,
}

impl StoreStatus {
    /// Whether the last contact succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Seconds since the last successful contact.
    pub fn stale_for(&self) -> i64 {
        now() - self.last_ok.load(Ordering::Relaxed)
    }

    pub(crate) fn ok(&self) {
        self.last_ok.store(now(), Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("store reachable; snapshot follows the store again");
        }
    }

    pub(crate) fn failed(&self, e: &StoreError) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "store unreachable; serving from the last snapshot");
        }
    }
}
