//! Monthly token quotas per account (calendar month, UTC), enforced fleet-wide by leases.
//!
//! An edge serves an account's tokens only from its *lease*: a share of the month's quota it
//! drew from the store ahead of use ([`lease`] has the arithmetic, [`crate::leasing`] the
//! control-plane task that draws, renews and gives back). Since the store never leases more
//! than the quota, the tokens a fleet delivers never exceed it, whatever the burst and the
//! number of edges.
//!
//! A request reserves its likely cost at admission (prompt estimate + `max_tokens`, or
//! `limits.default_max_tokens`) from the lease, and settles to what it really used when it
//! ends. When the lease runs low the edge asks the control plane for more without waiting; a
//! request that does not fit waits for that draw, at most `limits.lease_wait`. A stream that
//! outgrows its hold takes more from the lease, and is cut once the store has said the pool is
//! dry (or cannot be reached).

pub mod lease;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::error::EdgeError;
use lease::Rows;

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

/// How long the store's "the pool is dry" or a failed draw stands before the edge asks again.
const STANDING: Duration = Duration::from_secs(1);

/// How leases are sized and kept (`limits.lease_*`, the names they serialize under).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LeaseSettings {
    /// A lease covers this much of the account's recent consumption on this edge.
    #[serde(rename = "lease_horizon")]
    pub horizon: Duration,
    /// A lease not renewed for this long is no longer used by its edge; after twice this long
    /// the other edges take back its unused part.
    #[serde(rename = "lease_ttl")]
    pub ttl: Duration,
    /// How long a request waits for a draw when the lease cannot cover it.
    #[serde(rename = "lease_wait")]
    pub wait: Duration,
    /// A lease unused this long goes back to the pool.
    #[serde(rename = "lease_idle")]
    pub idle: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            horizon: Duration::from_secs(10),
            ttl: Duration::from_secs(30),
            wait: Duration::from_millis(500),
            idle: Duration::from_secs(20),
        }
    }
}

/// What the store last said, when the lease cannot cover a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// The pool is dry: nothing is left to lease this month.
    Dry,
    /// The last draw failed: the store is unreachable.
    Unreachable,
}

/// One account's lease on this edge, for the month of `month`.
#[derive(Debug)]
struct State {
    month: i64,
    /// The account's quota (from its plan, as the last request saw it).
    limit: u64,
    /// Tokens the lease grants, as the store last said (cumulative for the month).
    granted: u64,
    /// Tokens settled by this edge under the lease (cumulative).
    used: u64,
    /// Tokens held by requests in flight.
    reserved: u64,
    /// Tokens the rest of the fleet holds, as of the last draw (for the remaining-tokens header).
    others: u64,
    /// The lease may be used until then (a ttl after the store last confirmed it).
    valid_until: Option<Instant>,
    /// What the store last said, and until when it stands.
    standing: Option<(Standing, Instant)>,
    /// A draw is on its way.
    asking: bool,
    /// The largest estimate waiting for that draw.
    waiting: u64,
    /// Tokens admitted in the current and the previous horizon, to size draws.
    window: (Instant, u64, u64),
    /// The last estimate admitted (a draw covers at least two).
    last_estimate: u64,
    last_active: Instant,
}

impl State {
    fn new(month: i64, at: Instant) -> Self {
        Self {
            month,
            limit: 0,
            granted: 0,
            used: 0,
            reserved: 0,
            others: 0,
            valid_until: None,
            standing: None,
            asking: false,
            waiting: 0,
            window: (at, 0, 0),
            last_estimate: 0,
            last_active: at,
        }
    }

    /// Tokens of the lease nobody holds.
    fn free(&self, at: Instant) -> u64 {
        match self.valid_until {
            Some(t) if t > at => self.granted.saturating_sub(self.used + self.reserved),
            _ => 0,
        }
    }

    fn standing(&self, at: Instant) -> Option<Standing> {
        self.standing
            .filter(|(_, until)| *until > at)
            .map(|(s, _)| s)
    }

    /// Tokens to draw now: what is held beyond the lease, plus the largest waiting request.
    fn need(&self) -> u64 {
        (self.used + self.reserved + self.waiting).saturating_sub(self.granted)
    }

    /// Tokens to draw ideally: the recent consumption, and at least two estimates.
    fn want(&self) -> u64 {
        let (_, now, before) = self.window;
        now.max(before).max(2 * self.last_estimate)
    }

    fn count(&mut self, tokens: u64, at: Instant, horizon: Duration) {
        let (start, now, _) = self.window;
        let elapsed = at.saturating_duration_since(start);
        if elapsed >= horizon * 2 {
            self.window = (at, 0, 0);
        } else if elapsed >= horizon {
            self.window = (at, 0, now);
        }
        self.window.1 += tokens;
        self.last_active = at;
    }
}

/// One account's state and the signal its waiters wait on.
#[derive(Debug)]
struct Account {
    state: Mutex<State>,
    /// Bumped when a draw ends (granted, dry or failed).
    drawn: watch::Sender<()>,
}

impl Account {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tokens held for one request until it settles. Dropping it unsettled releases the hold.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<Account>,
    asks: mpsc::UnboundedSender<String>,
    id: Arc<str>,
    month: i64,
    /// Tokens held.
    pub amount: u64,
    /// The account's quota.
    pub limit: u64,
    /// Tokens left fleet-wide after this reservation, at admission, as far as this edge knows.
    pub remaining: u64,
    settled: bool,
}

impl Reservation {
    /// Whether `delivered` tokens for this request take the account past its quota. A stream
    /// that outgrows its hold takes more from the lease; when the lease has none, it goes on
    /// and asks for a draw, unless the store has said the pool is dry or cannot be reached.
    pub fn crosses(&mut self, delivered: u64) -> bool {
        if delivered <= self.amount {
            return false;
        }
        let at = Instant::now();
        let mut st = self.account.lock();
        if st.month != self.month {
            return false;
        }
        let take = (delivered - self.amount).min(st.free(at));
        st.reserved += take;
        self.amount += take;
        if delivered <= self.amount {
            return false;
        }
        if st.standing(at).is_some() {
            return true;
        }
        // Over the lease while a draw may still come: hold what was delivered (the draw asks
        // for it) rather than cut an answer the quota may well cover.
        st.reserved += delivered - self.amount;
        self.amount = delivered;
        ask(&mut st, &self.asks, &self.id);
        false
    }

    /// Replaces the hold with the tokens really used.
    pub fn settle(&mut self, used: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut st = self.account.lock();
        if st.month == self.month {
            st.reserved -= self.amount;
            st.used += used;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.settle(0);
    }
}

/// Why a request got no tokens.
#[derive(Debug)]
pub enum Refusal {
    /// The quota is used up (the store said the pool is dry).
    Exceeded,
    /// The store could not be reached for more.
    Unavailable,
    /// The lease is short: a draw was asked for; wait for it on this signal.
    Lacking(watch::Receiver<()>),
}

/// Sends the account to the control plane for a draw, once until it answers.
fn ask(st: &mut State, asks: &mpsc::UnboundedSender<String>, id: &str) {
    if !st.asking {
        st.asking = true;
        // The receiver lives as long as the control plane; without it nobody could answer.
        let _ = asks.send(id.to_owned());
    }
}

/// What the control plane draws for an account: see [`QuotaBook::ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// `YYYY-MM`.
    pub month: String,
    /// The account's quota.
    pub quota: u64,
    /// Tokens used under the lease, to report.
    pub used: u64,
    /// Tokens needed now.
    pub need: u64,
    /// Tokens wanted.
    pub want: u64,
}

/// An account's lease as the control plane renews or gives it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Account id.
    pub account: String,
    /// `YYYY-MM`.
    pub month: String,
    /// Tokens used under the lease, to report.
    pub used: u64,
    /// Tokens to keep when giving back: used, and held by requests in flight.
    pub keep: u64,
    /// Nothing was admitted for `limits.lease_idle` and nothing is in flight.
    pub idle: bool,
}

/// Every account's lease on this edge.
#[derive(Debug)]
pub struct QuotaBook {
    accounts: Mutex<HashMap<Arc<str>, Arc<Account>>>,
    asks: mpsc::UnboundedSender<String>,
    settings: LeaseSettings,
}

impl QuotaBook {
    /// An empty book, and the receiving end of its requests for draws (the control plane's).
    pub fn new(settings: LeaseSettings) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (asks, rx) = mpsc::unbounded_channel();
        let book = Self {
            accounts: Mutex::new(HashMap::new()),
            asks,
            settings,
        };
        (book, rx)
    }

    /// The lease settings.
    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    /// `moltghost_quota_remaining_ratio`: for each account this edge served this month (as of
    /// `now`), the share of its quota left fleet-wide as the edge last heard from the store
    /// (Prometheus text, appended to `/metrics`).
    pub fn prometheus(&self, now: i64) -> String {
        use std::fmt::Write;
        let month = month_index(now);
        let mut out = String::from(
            "# HELP moltghost_quota_remaining_ratio Share of the account's monthly quota left fleet-wide, as this edge last heard\n\
             # TYPE moltghost_quota_remaining_ratio gauge\n",
        );
        let map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        for (id, a) in map.iter() {
            let st = a.lock();
            if st.month != month || st.limit == 0 {
                continue;
            }
            let left = st.limit.saturating_sub(st.others + st.used + st.reserved);
            let id = id.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "moltghost_quota_remaining_ratio{{account=\"{id}\"}} {}",
                left as f64 / st.limit as f64
            );
        }
        out
    }

    /// The account's state, rolled to the month of `now`.
    fn account(&self, id: &str, now: i64, at: Instant) -> (Arc<str>, Arc<Account>) {
        let month = month_index(now);
        let mut map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let (id, a) = match map.get_key_value(id) {
            Some((k, a)) => (k.clone(), a.clone()),
            None => {
                let a = Arc::new(Account {
                    state: Mutex::new(State::new(month, at)),
                    drawn: watch::Sender::new(()),
                });
                let k: Arc<str> = id.into();
                map.insert(k.clone(), a.clone());
                (k, a)
            }
        };
        drop(map);
        {
            let mut st = a.lock();
            if st.month != month {
                *st = State::new(month, at);
            }
        }
        (id, a)
    }

    /// Reserves `estimate` tokens of `limit` from the account's lease, or says why not. A
    /// request that can be cut when it crosses the quota (a stream) is admitted while the
    /// lease has anything free, its hold capped at that; one that cannot (a whole answer) only
    /// when its whole estimate fits, so it never overshoots by more than it under-estimated.
    pub fn reserve(
        &self,
        id: &str,
        limit: u64,
        estimate: u64,
        cuttable: bool,
        now: i64,
        at: Instant,
    ) -> Result<Reservation, Refusal> {
        let (id, account) = self.account(id, now, at);
        let mut st = account.lock();
        st.limit = limit;
        let free = st.free(at);
        let fits = if cuttable { free > 0 } else { free >= estimate };
        if !fits {
            return match st.standing(at) {
                Some(Standing::Dry) => Err(Refusal::Exceeded),
                Some(Standing::Unreachable) => Err(Refusal::Unavailable),
                None => {
                    st.waiting = st.waiting.max(estimate.max(1));
                    st.last_estimate = estimate;
                    ask(&mut st, &self.asks, &id);
                    Err(Refusal::Lacking(account.drawn.subscribe()))
                }
            };
        }
        let amount = estimate.min(free).max(1);
        st.reserved += amount;
        st.last_estimate = estimate;
        st.count(estimate, at, self.settings.horizon);
        // Top up ahead of need, so requests rarely wait: once half of what the edge wants is
        // gone, and while the pool is not known to be dry.
        if st.free(at) <= st.want() / 2 && st.standing(at).is_none() {
            ask(&mut st, &self.asks, &id);
        }
        let remaining = limit.saturating_sub(st.others + st.used + st.reserved);
        let month = st.month;
        drop(st);
        Ok(Reservation {
            account,
            asks: self.asks.clone(),
            id,
            month,
            amount,
            limit,
            remaining,
            settled: false,
        })
    }

    /// [`QuotaBook::reserve`], waiting for a draw at most `limits.lease_wait` when the lease
    /// is short.
    pub async fn admit(
        &self,
        id: &str,
        limit: u64,
        estimate: u64,
        cuttable: bool,
    ) -> Result<Reservation, EdgeError> {
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        loop {
            let now = crate::store::now();
            match self.reserve(id, limit, estimate, cuttable, now, Instant::now()) {
                Ok(r) => return Ok(r),
                Err(Refusal::Exceeded) => return Err(EdgeError::QuotaExceeded),
                Err(Refusal::Unavailable) => return Err(EdgeError::QuotaUnavailable),
                Err(Refusal::Lacking(mut drawn)) => {
                    match tokio::time::timeout_at(deadline, drawn.changed()).await {
                        Ok(Ok(())) => {}
                        _ => return Err(EdgeError::QuotaUnavailable),
                    }
                }
            }
        }
    }

    /// What to draw for account `id`, asked for by [`QuotaBook::reserve`]; `None` when there is
    /// nothing to draw (the month rolled, or the request went).
    pub fn ask(&self, id: &str, now: i64) -> Option<Ask> {
        let (_, account) = self.account(id, now, Instant::now());
        let st = account.lock();
        (st.limit > 0).then(|| Ask {
            month: month_of(now),
            quota: st.limit,
            used: st.used,
            need: st.need(),
            want: st.want(),
        })
    }

    /// A draw for `id` in `month` came back with the store's rows.
    pub fn drawn(&self, id: &str, month: &str, rows: Rows, at: Instant) {
        self.answered(id, month, |st| {
            st.granted = rows.lease.granted;
            st.others = rows.pool - rows.lease.granted;
            st.valid_until = Some(at + self.settings.ttl);
            st.standing = (rows.left() == 0).then_some((Standing::Dry, at + STANDING));
        });
    }

    /// A draw for `id` failed: requests the lease cannot cover are refused for a moment.
    pub fn draw_failed(&self, id: &str, month: &str, at: Instant) {
        self.answered(id, month, |st| {
            st.standing = Some((Standing::Unreachable, at + STANDING));
        });
    }

    /// A draw ended: applies its answer, and wakes the requests waiting for it.
    fn answered(&self, id: &str, month: &str, apply: impl FnOnce(&mut State)) {
        if let Some(account) = self.apply(id, month, |st| {
            apply(st);
            st.asking = false;
            st.waiting = 0;
        }) {
            account.drawn.send_replace(());
        }
    }

    /// Applies what the store said to the account's state, if it is still of `month`.
    fn apply(&self, id: &str, month: &str, apply: impl FnOnce(&mut State)) -> Option<Arc<Account>> {
        let map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let account = map.get(id).cloned()?;
        drop(map);
        {
            let mut st = account.lock();
            if month_of_index(st.month) == month {
                apply(&mut st);
            }
        }
        Some(account)
    }

    /// The leases this edge holds for the month of `now`, to renew or give back. An idle
    /// lease (or every one, with `everything`: at shutdown) shrinks here to what it keeps
    /// before the store hears of it, so no request takes tokens that are on their way back.
    pub fn held(&self, now: i64, everything: bool) -> Vec<Held> {
        let at = Instant::now();
        let month = month_index(now);
        let map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (id, a) in map.iter() {
            let mut st = a.lock();
            if st.month != month || st.granted == 0 {
                continue;
            }
            let keep = st.used + st.reserved;
            let idle = everything
                || (st.reserved == 0
                    && at.saturating_duration_since(st.last_active) >= self.settings.idle);
            if idle {
                st.granted = st.granted.min(keep);
            }
            out.push(Held {
                account: id.to_string(),
                month: month_of(now),
                used: st.used,
                keep,
                idle,
            });
        }
        out
    }

    /// The store confirmed these leases: they may be used for another ttl. A lease the store
    /// no longer has (taken back while this edge could not renew) starts again from nothing;
    /// what it used is already counted in the pool.
    pub fn renewed(&self, month: &str, kept: &[String], lost: &[String], at: Instant) {
        for id in kept {
            self.apply(id, month, |st| {
                st.valid_until = Some(at + self.settings.ttl)
            });
        }
        for id in lost {
            self.apply(id, month, |st| {
                st.granted = 0;
                st.used = 0;
                st.valid_until = None;
            });
        }
    }

    /// A give-back came back with the store's rows.
    pub fn gave_back(&self, id: &str, month: &str, rows: Rows) {
        self.apply(id, month, |st| {
            st.granted = st.granted.min(rows.lease.granted);
            st.others = rows.pool - rows.lease.granted;
        });
    }
}

#[cfg(test)]
impl QuotaBook {
    /// A book whose account `id` leases its whole quota `limit` (for tests of what stands on
    /// the book).
    pub fn holding_all(id: &str, limit: u64, now: i64) -> Self {
        let book = Self::new(LeaseSettings::default()).0;
        let _ = book.reserve(id, limit, 1, true, now, Instant::now());
        let rows = Rows {
            quota: limit,
            pool: limit,
            lease: lease::Lease {
                granted: limit,
                used: 0,
            },
        };
        book.drawn(id, &month_of(now), rows, Instant::now());
        book
    }
}

/// `YYYY-MM` of a month index.
fn month_of_index(i: i64) -> String {
    let (y, m) = ((i - 1).div_euclid(12), (i - 1).rem_euclid(12) + 1);
    format!("{y:04}-{m:02}")
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

    /// The control plane's part, done by hand: draws for what `book` asked, from `pool`.
    fn draw(book: &QuotaBook, pool: &mut Rows, id: &str, now: i64) {
        let ask = book.ask(id, now).expect("an ask");
        pool.quota = ask.quota;
        pool.draw(ask.used, ask.need, ask.want);
        book.drawn(id, &ask.month, *pool, Instant::now());
    }

    fn book() -> QuotaBook {
        QuotaBook::new(LeaseSettings::default()).0
    }

    const T: i64 = NOV_30_2026_2359;

    #[test]
    fn a_request_the_lease_cannot_cover_waits_for_a_draw() {
        let (book, mut asks) = QuotaBook::new(LeaseSettings::default());
        let Err(Refusal::Lacking(drawn)) = book.reserve("a", 1_000, 60, false, T, Instant::now())
        else {
            panic!("no lease yet: the request must wait")
        };
        assert_eq!(asks.try_recv().unwrap(), "a");
        let ask = book.ask("a", T).unwrap();
        assert_eq!((ask.quota, ask.need, ask.want), (1_000, 60, 120));
        let mut pool = Rows::default();
        draw(&book, &mut pool, "a", T);
        assert!(drawn.has_changed().unwrap(), "the waiters are woken");
        let r = book
            .reserve("a", 1_000, 60, false, T, Instant::now())
            .unwrap();
        assert_eq!((r.amount, r.remaining), (60, 940));
        // The lease is half gone: a top-up is asked for, once.
        assert_eq!(asks.try_recv().unwrap(), "a");
        let _r2 = book
            .reserve("a", 1_000, 30, false, T, Instant::now())
            .unwrap();
        assert!(asks.try_recv().is_err());
    }

    #[test]
    fn a_dry_pool_refuses_and_cuts() {
        let book = book();
        let mut pool = Rows::default();
        let _ = book.reserve("a", 100, 100, false, T, Instant::now());
        draw(&book, &mut pool, "a", T);
        assert_eq!(pool.left(), 0);
        let mut a = book
            .reserve("a", 100, 60, false, T, Instant::now())
            .unwrap();
        let mut b = book.reserve("a", 100, 60, true, T, Instant::now()).unwrap();
        assert_eq!(b.amount, 40, "a stream's hold is capped at what is free");
        assert!(matches!(
            book.reserve("a", 100, 1, true, T, Instant::now()),
            Err(Refusal::Exceeded)
        ));
        assert!(!b.crosses(40));
        a.settle(50); // 10 come back to the lease
        assert!(!b.crosses(50), "the stream takes them");
        assert!(b.crosses(51), "then it is cut: the pool is dry");
    }

    #[test]
    fn a_stream_over_its_lease_goes_on_while_a_draw_may_come() {
        let (book, mut asks) = QuotaBook::new(LeaseSettings::default());
        let mut pool = Rows {
            quota: 1_000,
            ..Rows::default()
        };
        let _ = book.reserve("a", 1_000, 10, true, T, Instant::now());
        draw(&book, &mut pool, "a", T);
        while asks.try_recv().is_ok() {}
        let mut r = book
            .reserve("a", 1_000, 10, true, T, Instant::now())
            .unwrap();
        let granted = pool.lease.granted;
        assert!(!r.crosses(granted + 5), "over the lease, the pool not dry");
        assert_eq!(asks.try_recv().unwrap(), "a");
        assert_eq!(book.ask("a", T).unwrap().need, 5);
        book.draw_failed("a", "2026-11", Instant::now());
        assert!(r.crosses(granted + 6), "the store is unreachable: cut");
        drop(r);
        assert!(
            book.reserve("a", 1_000, 10, false, T, Instant::now())
                .is_ok(),
            "what the lease holds is served while the store is away"
        );
        assert!(matches!(
            book.reserve("a", 1_000, granted + 1, false, T, Instant::now()),
            Err(Refusal::Unavailable)
        ));
    }

    #[test]
    fn idle_leases_shrink_before_they_are_given_back() {
        let book = QuotaBook::new(LeaseSettings {
            idle: Duration::ZERO,
            ..LeaseSettings::default()
        })
        .0;
        let mut pool = Rows::default();
        let _ = book.reserve("a", 1_000, 100, false, T, Instant::now());
        draw(&book, &mut pool, "a", T);
        let mut r = book
            .reserve("a", 1_000, 100, false, T, Instant::now())
            .unwrap();
        let held = book.held(T, false);
        assert_eq!(held.len(), 1);
        assert!(!held[0].idle, "a request is in flight");
        r.settle(30);
        let held = book.held(T, false);
        assert_eq!((held[0].used, held[0].keep, held[0].idle), (30, 30, true));
        assert!(
            matches!(
                book.reserve("a", 1_000, 10, false, T, Instant::now()),
                Err(Refusal::Lacking(_))
            ),
            "what is on its way back is not lent again"
        );
        pool.give_back(30, 30);
        book.gave_back("a", "2026-11", pool);
        assert_eq!(pool.pool, 30);
    }

    #[test]
    fn the_share_left_is_exported_per_account() {
        let book = book();
        let mut pool = Rows::default();
        let _ = book.reserve("a\"x", 1_000, 100, false, T, Instant::now());
        draw(&book, &mut pool, "a\"x", T);
        let _r = book
            .reserve("a\"x", 1_000, 150, false, T, Instant::now())
            .unwrap();
        let text = book.prometheus(T);
        assert!(
            text.contains("moltghost_quota_remaining_ratio{account=\"a\\\"x\"} 0.85"),
            "{text}"
        );
        assert!(
            !book.prometheus(T + 60).contains("account="),
            "last month's"
        );
    }

    #[test]
    fn a_new_month_starts_from_nothing() {
        let book = book();
        let mut pool = Rows::default();
        let _ = book.reserve("a", 100, 100, false, T, Instant::now());
        draw(&book, &mut pool, "a", T);
        let mut old = book
            .reserve("a", 100, 100, false, T, Instant::now())
            .unwrap();
        assert!(matches!(
            book.reserve("a", 100, 10, false, T + 60, Instant::now()),
            Err(Refusal::Lacking(_))
        ));
        // Last month's request settling late leaves the new month alone.
        old.settle(100);
        assert_eq!(book.ask("a", T + 60).unwrap().used, 0);
    }
}
