//! The arithmetic of quota leases, without I/O: what the store grants an edge that asks, and
//! what a give-back or a reclaim returns to the account's pool.
//!
//! An account's *pool* for a month counts every token leased to some edge (plus what the ledger
//! held when the pool was opened). A *lease* is one edge process's share: `granted` tokens it may
//! use this month, `used` of which it has reported. Both only ever move inside one store
//! transaction that holds the pool row, so the pool never passes the quota through a grant,
//! and an edge that keeps within its lease keeps the fleet within the quota.

/// Near the end of the quota an edge gets at most this fraction of what is left, so that the
/// last tokens spread over the edges that still serve the account instead of sitting unused in
/// one edge's lease.
pub const SHARE: u64 = 4;

/// One account's pool and one edge's lease, as the store holds them for a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rows {
    /// The account's quota for the month.
    pub quota: u64,
    /// Tokens the pool has leased out (or found used when it opened).
    pub pool: u64,
    /// The edge's lease.
    pub lease: Lease,
}

/// One edge's lease on one account's month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lease {
    /// Tokens the edge may use this month (cumulative).
    pub granted: u64,
    /// Tokens it reported used (cumulative).
    pub used: u64,
}

impl Rows {
    /// Tokens nobody holds yet.
    pub fn left(&self) -> u64 {
        self.quota.saturating_sub(self.pool)
    }

    /// Records `used` as the edge reports it. An edge that went past its lease (a stream that
    /// overran while a draw was on its way) has its excess counted in the pool, so that the
    /// rest of the fleet is granted that much less.
    pub fn report(&mut self, used: u64) {
        self.lease.used = self.lease.used.max(used);
        if self.lease.used > self.lease.granted {
            self.pool += self.lease.used - self.lease.granted;
            self.lease.granted = self.lease.used;
        }
    }

    /// Grants the edge what it asks for: `need` now (the requests waiting, at least) and `want`
    /// ideally (its recent consumption). Near the end it gets at most a [`SHARE`] of what is
    /// left, but never less than `need` while that much is left. Returns the tokens granted.
    pub fn draw(&mut self, used: u64, need: u64, want: u64) -> u64 {
        self.report(used);
        let left = self.left();
        let grant = want.max(need).min(left / SHARE).max(need).min(left);
        self.pool += grant;
        self.lease.granted += grant;
        grant
    }

    /// Gives back what the edge does not hold: it keeps `keep` tokens (what it used and what
    /// requests in flight hold). Returns the tokens given back.
    pub fn give_back(&mut self, used: u64, keep: u64) -> u64 {
        self.report(used);
        let keep = keep.max(self.lease.used);
        let back = self.lease.granted.saturating_sub(keep);
        self.lease.granted -= back;
        self.pool -= back;
        back
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draw_is_what_is_wanted_while_plenty_is_left() {
        let mut r = Rows {
            quota: 1_000_000,
            ..Rows::default()
        };
        assert_eq!(r.draw(0, 10, 500), 500);
        assert_eq!((r.pool, r.lease.granted), (500, 500));
        // The need wins over a smaller want.
        assert_eq!(r.draw(0, 800, 500), 800);
    }

    #[test]
    fn near_the_end_an_edge_gets_a_share_but_at_least_its_need() {
        let mut r = Rows {
            quota: 1_000,
            pool: 600,
            ..Rows::default()
        };
        assert_eq!(r.draw(0, 10, 400), 100, "a quarter of the 400 left");
        assert_eq!(r.draw(0, 200, 400), 200, "the need, while it fits");
        assert_eq!(r.draw(0, 500, 500), 100, "never more than is left");
        assert_eq!(r.left(), 0);
        assert_eq!(r.draw(0, 1, 1), 0);
    }

    #[test]
    fn give_back_keeps_what_is_used_and_held() {
        let mut r = Rows {
            quota: 10_000,
            ..Rows::default()
        };
        r.draw(0, 0, 300);
        assert_eq!(r.give_back(100, 150), 150);
        assert_eq!(
            (r.pool, r.lease),
            (
                150,
                Lease {
                    granted: 150,
                    used: 100
                }
            )
        );
        assert_eq!(r.give_back(150, 0), 0, "what was used stays leased");
    }

    #[test]
    fn an_overrun_is_counted_in_the_pool() {
        let mut r = Rows {
            quota: 100,
            ..Rows::default()
        };
        r.draw(0, 0, 100);
        r.report(120);
        assert_eq!((r.pool, r.lease.granted), (120, 120));
        assert_eq!(r.draw(120, 10, 10), 0);
    }

    /// A tiny seeded generator, so that the property test needs no dependency and replays.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n.max(1)
        }
    }

    /// Edges that draw, use within their lease and give back, in any interleaving: the pool
    /// never passes the quota, it always equals what the leases hold, nothing is used beyond a
    /// lease, and once everything is given back the pool is exactly what was used.
    #[test]
    fn no_interleaving_leases_more_than_the_quota() {
        for seed in 0..2_000 {
            let mut rng = Lcg(seed);
            let quota = 1 + rng.below(5_000);
            let edges = 1 + rng.below(6) as usize;
            let mut pool = 0;
            let mut leases = vec![Lease::default(); edges];
            // What each edge really used (it reports with a lag).
            let mut used = vec![0u64; edges];
            for _ in 0..200 {
                let e = rng.below(edges as u64) as usize;
                let mut rows = Rows {
                    quota,
                    pool,
                    lease: leases[e],
                };
                match rng.below(3) {
                    0 => {
                        rows.draw(used[e], rng.below(100), rng.below(1_000));
                    }
                    1 => used[e] += rng.below(rows.lease.granted - used[e] + 1),
                    _ => {
                        rows.give_back(used[e], used[e] + rng.below(50));
                    }
                }
                (pool, leases[e]) = (rows.pool, rows.lease);
                assert!(pool <= quota, "seed {seed}: pool {pool} over {quota}");
                assert_eq!(pool, leases.iter().map(|l| l.granted).sum::<u64>());
                assert!(
                    used[e] <= leases[e].granted,
                    "seed {seed}: used past the lease"
                );
            }
            for e in 0..edges {
                let mut rows = Rows {
                    quota,
                    pool,
                    lease: leases[e],
                };
                rows.give_back(used[e], 0);
                (pool, leases[e]) = (rows.pool, rows.lease);
            }
            assert_eq!(pool, used.iter().sum::<u64>(), "seed {seed}");
        }
    }
}
