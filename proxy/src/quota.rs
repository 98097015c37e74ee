//! Monthly token quotas per account (calendar month, UTC).
//!
//! A request reserves its likely cost at admission (prompt estimate + `max_tokens`, or
//! `limits.default_max_tokens`), and settles to what it really used when it ends. An account's
//! use is: what this edge settled this month, what the other edges settled (from the ledger,
//! refreshed every `limits.fleet_sync`), and what is reserved in flight here and on the other
//! edges. Admission refuses once that reaches the quota; a stream that crosses it is cut.
//!
//! The fleet-wide over-admission bound: at most what other edges admitted or settled in the
//! last sync interval that this edge has not yet heard of, plus, for requests that cannot be
//! cut (non-streamed answers), what each used beyond its reservation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::EdgeError;

/// `YYYY-MM` of a Unix time, UTC.
pub fn month_of(unix: i64) -> String {
    let (y, m) = year_month(unix);
    format!("{y:04}-{m:02}")
}

/// (year, month) of a Unix time, UTC (Howard Hinnant's civil-from-days).
pub fn year_month(unix: i64) -> (i64, u32) {
    let days = unix.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

fn month_index(unix: i64) -> i64 {
    let (y, m) = year_month(unix);
    y * 12 + i64::from(m)
}

/// One account's use this month, as this edge knows it.
#[derive(Debug, Default)]
pub struct AccountQuota {
    month: AtomicI64,
    mine: AtomicU64,
    others: AtomicU64,
    others_reserved: AtomicU64,
    reserved: AtomicU64,
}

impl AccountQuota {
    /// Tokens used or reserved, fleet-wide as far as this edge knows.
    pub fn used(&self) -> u64 {
        self.mine.load(Ordering::Relaxed)
            + self.others.load(Ordering::Relaxed)
            + self.others_reserved.load(Ordering::Relaxed)
            + self.reserved.load(Ordering::Relaxed)
    }

    fn roll(&self, month: i64) {
        if self.month.swap(month, Ordering::Relaxed) != month {
            self.mine.store(0, Ordering::Relaxed);
            self.others.store(0, Ordering::Relaxed);
            self.others_reserved.store(0, Ordering::Relaxed);
            self.reserved.store(0, Ordering::Relaxed);
        }
    }
}

/// Tokens held for one request until it settles. Dropping it unsettled releases the hold.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<AccountQuota>,
    month: i64,
    /// Tokens held.
    pub amount: u64,
    /// The account's quota.
    pub limit: u64,
    /// Tokens left after this reservation, at admission.
    pub remaining: u64,
    settled: bool,
}

impl Reservation {
    /// Whether `delivered` tokens for this request would take the account past its quota.
    pub fn crosses(&self, delivered: u64) -> bool {
        let others = self.account.used().saturating_sub(self.amount);
        others + delivered > self.limit
    }

    /// Replaces the hold with the tokens really used.
    pub fn settle(&mut self, used: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        if self.account.month.load(Ordering::Relaxed) == self.month {
            self.account
                .reserved
                .fetch_sub(self.amount, Ordering::Relaxed);
            self.account.mine.fetch_add(used, Ordering::Relaxed);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.settle(0);
    }
}

/// Every account's quota state on this edge.
#[derive(Debug, Default)]
pub struct QuotaBook {
    accounts: Mutex<HashMap<String, Arc<AccountQuota>>>,
}

impl QuotaBook {
    /// The account's state for the month of `now`.
    fn account(&self, id: &str, now: i64) -> Arc<AccountQuota> {
        let month = month_index(now);
        let mut map = self.accounts.lock().expect("quota lock");
        let a = map.entry(id.to_owned()).or_insert_with(|| {
            let a = AccountQuota::default();
            a.month.store(month, Ordering::Relaxed);
            Arc::new(a)
        });
        a.roll(month);
        a.clone()
    }

    /// Reserves `estimate` tokens of `limit` for a request of account `id`, or refuses it. A
    /// request that can be cut when it crosses the quota (a stream) is admitted while anything is
    /// left, its hold capped at what is left; one that cannot (a whole answer) only when its
    /// whole estimate fits, so it can never overshoot by more than it under-estimated.
    pub fn reserve(
        &self,
        id: &str,
        limit: u64,
        estimate: u64,
        cuttable: bool,
        now: i64,
    ) -> Result<Reservation, EdgeError> {
        let account = self.account(id, now);
        let used = account.used();
        if used >= limit || (!cuttable && used + estimate > limit) {
            return Err(EdgeError::QuotaExceeded);
        }
        let amount = estimate.min(limit - used).max(1);
        account.reserved.fetch_add(amount, Ordering::Relaxed);
        Ok(Reservation {
            remaining: limit.saturating_sub(used + amount),
            account,
            month: month_index(now),
            amount,
            limit,
            settled: false,
        })
    }

    /// Sets what the store says this edge (`mine`, at start) and the others used this month,
    /// and what the others hold in flight.
    pub fn set_fleet(
        &self,
        id: &str,
        now: i64,
        mine: Option<u64>,
        others: u64,
        others_reserved: u64,
    ) {
        let a = self.account(id, now);
        if let Some(m) = mine {
            a.mine.store(m, Ordering::Relaxed);
        }
        a.others.store(others, Ordering::Relaxed);
        a.others_reserved.store(others_reserved, Ordering::Relaxed);
    }

    /// This edge's reservations in flight, per account (what it tells the fleet).
    pub fn reservations(&self) -> Vec<(String, u64)> {
        let map = self.accounts.lock().expect("quota lock");
        map.iter()
            .map(|(id, a)| (id.clone(), a.reserved.load(Ordering::Relaxed)))
            .collect()
    }

    /// The accounts this edge has seen.
    pub fn accounts(&self) -> Vec<String> {
        self.accounts
            .lock()
            .expect("quota lock")
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_30_2026_2359: i64 = 1_796_083_140; // 2026-11-30T23:59:00Z

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(NOV_30_2026_2359), "2026-11");
        assert_eq!(month_of(NOV_30_2026_2359 + 60), "2026-12");
        assert_eq!(month_of(951_782_400), "2000-02"); // 2000-02-29T00:00:00Z, a leap day
        assert_eq!(month_of(1_709_251_199), "2024-02"); // 2024-02-29T23:59:59Z
    }

    #[test]
    fn reserve_settle_and_refuse() {
        let book = QuotaBook::default();
        let mut a = book
            .reserve("acct", 100, 60, true, NOV_30_2026_2359)
            .unwrap();
        assert_eq!((a.amount, a.remaining), (60, 40));
        let b = book
            .reserve("acct", 100, 60, true, NOV_30_2026_2359)
            .unwrap();
        assert_eq!(b.amount, 40, "capped at what is left");
        assert_eq!(
            book.reserve("acct", 100, 1, true, NOV_30_2026_2359)
                .unwrap_err(),
            EdgeError::QuotaExceeded
        );
        a.settle(10);
        drop(b); // released unused
        let c = book
            .reserve("acct", 100, 50, true, NOV_30_2026_2359)
            .unwrap();
        assert_eq!(c.remaining, 40);
        assert!(!c.crosses(50));
        assert!(c.crosses(91));
    }

    #[test]
    fn a_new_month_starts_from_zero() {
        let book = QuotaBook::default();
        let mut a = book
            .reserve("acct", 100, 100, true, NOV_30_2026_2359)
            .unwrap();
        a.settle(100);
        assert!(book
            .reserve("acct", 100, 1, true, NOV_30_2026_2359)
            .is_err());
        let next = book
            .reserve("acct", 100, 10, true, NOV_30_2026_2359 + 60)
            .unwrap();
        assert_eq!(next.remaining, 90);
        // A reservation from last month settling late does not leak into the new one.
        let mut old = Reservation {
            account: next.account.clone(),
            month: month_index(NOV_30_2026_2359),
            amount: 5,
            limit: 100,
            remaining: 0,
            settled: false,
        };
        old.settle(5);
        assert_eq!(next.account.used(), 10);
    }

    #[test]
    fn the_fleet_counts() {
        let book = QuotaBook::default();
        book.set_fleet("acct", NOV_30_2026_2359, Some(30), 50, 15);
        let r = book
            .reserve("acct", 100, 10, true, NOV_30_2026_2359)
            .unwrap();
        assert_eq!(
            r.remaining, 0,
            "30 mine + 50 others + 15 in flight elsewhere + 5 capped"
        );
        assert_eq!(r.amount, 5);
        drop(r);
        // A whole answer that does not fit is refused rather than admitted to overshoot.
        assert!(book
            .reserve("acct", 100, 10, false, NOV_30_2026_2359)
            .is_err());
        assert!(book
            .reserve("acct", 100, 5, false, NOV_30_2026_2359)
            .is_ok());
    }
}
