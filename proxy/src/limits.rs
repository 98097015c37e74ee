//! Request-rate and concurrent-stream limits per key, with `pingora-limits`.
//!
//! The rate is a sliding one-minute estimate (the previous minute's count weighted by how much
//! of it is still inside the window, plus the current minute's), kept in count-min sketches
//! sized so that thousands of active keys do not collide. Across a fleet, each edge adds the
//! other edges' counts for the key, exchanged through the store every `limits.fleet_sync`; the
//! error is bounded by what the other edges admitted in one sync interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::Rate;

use crate::config::Plan;
use crate::error::EdgeError;
use crate::registry::ApiKey;

const WINDOW: Duration = Duration::from_secs(60);
/// Hash rows of the sketches.
const HASHES: usize = 4;

/// The rate headers of an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// Requests per minute allowed.
    pub limit: u64,
    /// Requests left in the current minute.
    pub remaining: u64,
    /// Seconds until the window has room for one more.
    pub reset_secs: u64,
}

/// The edge's limiters.
pub struct Limiter {
    rate: Rate,
    streams: Inflight,
    remote: ArcSwap<HashMap<String, u64>>,
}

impl Limiter {
    /// Limiters whose sketches have `slots` columns.
    pub fn new(slots: usize) -> Self {
        Self {
            rate: Rate::new_with_estimator_config(WINDOW, HASHES, slots),
            streams: Inflight::new(),
            remote: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// This edge's sliding one-minute count for `key_id` (what it tells the fleet).
    pub fn local_count(&self, key_id: &str) -> u64 {
        self.rate.rate_with(&key_id, |c| {
            let prev = c.prev_samples.max(0) as f64 * (1.0 - c.current_interval_fraction);
            (prev + c.curr_samples.max(0) as f64).round() as u64
        })
    }

    /// Replaces what the other edges report.
    pub fn set_remote(&self, counts: HashMap<String, u64>) {
        self.remote.store(Arc::new(counts));
    }

    /// Admits one request of `key` under `plan`, or refuses it with `rate_limited` and `status`
    /// (403 or 429).
    pub fn count_request(
        &self,
        key: &ApiKey,
        plan: &Plan,
        status: u16,
    ) -> Result<RateInfo, EdgeError> {
        let limit = u64::from(plan.requests_per_minute);
        let (local, reset) = self.rate.rate_with(&key.id, |c| {
            let f = c.current_interval_fraction.clamp(0.0, 1.0);
            let prev = c.prev_samples.max(0) as f64;
            let curr = c.curr_samples.max(0) as f64;
            let count = prev * (1.0 - f) + curr;
            // When does the estimate fall below the limit? Within this minute as the previous
            // minute's weight fades, or else some way into the next one.
            let need = count + 1.0 - limit as f64;
            let reset = if need <= 0.0 {
                0.0
            } else if prev > 0.0 && need <= prev * (1.0 - f) {
                need / prev * 60.0
            } else {
                (1.0 - f) * 60.0
                    + if curr > 0.0 {
                        ((curr + 1.0 - limit as f64) / curr).clamp(0.0, 1.0) * 60.0
                    } else {
                        0.0
                    }
            };
            (count, reset)
        });
        let remote = self.remote.load().get(&key.id).copied().unwrap_or(0) as f64;
        let used = local + remote;
        if used + 1.0 > limit as f64 {
            let retry_after = (reset.ceil() as u64).clamp(1, 60);
            return Err(EdgeError::RateLimited {
                retry_after,
                status,
            });
        }
        self.rate.observe(&key.id, 1);
        Ok(RateInfo {
            limit,
            remaining: (limit as f64 - used - 1.0).max(0.0) as u64,
            reset_secs: reset.ceil() as u64,
        })
    }

    /// Counts a stream of `key` for as long as the guard lives, or refuses it past the plan's cap.
    pub fn open_stream(&self, key: &ApiKey, plan: &Plan, status: u16) -> Result<Guard, EdgeError> {
        let (guard, open) = self.streams.incr(&key.id, 1);
        if open > plan.concurrent_streams as isize {
            return Err(EdgeError::TooManyStreams {
                limit: plan.concurrent_streams,
                status,
            });
        }
        Ok(guard)
    }
}
