//! Quota leases in the store: draws, give-backs, renewals and the reclaim of leases whose edge
//! went quiet. Every change to a lease is one transaction that first holds the account's pool
//! row (an `UPDATE`, also on SQLite, where a transaction that starts with a read could not
//! later write while another did), and computes with [`crate::quota::lease`].

use sqlx::{Any, Row, Transaction};

use super::{query, Store, StoreError};
use crate::quota::lease::{Lease, Rows};

/// The pool row of `account` in `month`, held until the transaction ends; opened with what the
/// ledger already counts for the month when it is the first.
async fn hold_pool(
    tx: &mut Transaction<'_, Any>,
    account: &str,
    month: &str,
) -> Result<u64, StoreError> {
    query(
        "INSERT INTO quota_pools (account_id, month, leased) \
         SELECT $1, $2, CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) FROM usage_totals WHERE account_id = $3 AND month = $4 \
         ON CONFLICT (account_id, month) DO NOTHING",
    )
    .bind(account)
    .bind(month)
    .bind(account)
    .bind(month)
    .execute(&mut **tx)
    .await?;
    let leased: i64 = query(
        "UPDATE quota_pools SET leased = leased WHERE account_id = $1 AND month = $2 RETURNING leased",
    )
    .bind(account)
    .bind(month)
    .fetch_one(&mut **tx)
    .await?
    .try_get(0)?;
    Ok(leased as u64)
}

/// The pool (held) and `holder`'s lease.
async fn rows(
    tx: &mut Transaction<'_, Any>,
    holder: &str,
    account: &str,
    month: &str,
    quota: u64,
) -> Result<Rows, StoreError> {
    let pool = hold_pool(tx, account, month).await?;
    let lease = query(
        "SELECT granted, used FROM quota_leases WHERE account_id = $1 AND month = $2 AND holder = $3",
    )
    .bind(account)
    .bind(month)
    .bind(holder)
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| {
        Ok::<_, sqlx::Error>(Lease {
            granted: r.try_get::<i64, _>(0)? as u64,
            used: r.try_get::<i64, _>(1)? as u64,
        })
    })
    .transpose()?
    .unwrap_or_default();
    Ok(Rows { quota, pool, lease })
}

/// Writes the pool and the lease back.
async fn write(
    tx: &mut Transaction<'_, Any>,
    holder: &str,
    account: &str,
    month: &str,
    rows: &Rows,
    now: i64,
) -> Result<(), StoreError> {
    query("UPDATE quota_pools SET leased = $1 WHERE account_id = $2 AND month = $3")
        .bind(rows.pool as i64)
        .bind(account)
        .bind(month)
        .execute(&mut **tx)
        .await?;
    query(
        "INSERT INTO quota_leases (account_id, month, holder, granted, used, renewed_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (account_id, month, holder) DO UPDATE SET granted = excluded.granted, used = excluded.used, renewed_at = excluded.renewed_at",
    )
    .bind(account)
    .bind(month)
    .bind(holder)
    .bind(rows.lease.granted as i64)
    .bind(rows.lease.used as i64)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A draw's or a give-back's arguments: who, for which account and month, and what it used.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOf<'a> {
    /// The edge process holding the lease.
    pub holder: &'a str,
    /// The account.
    pub account: &'a str,
    /// `YYYY-MM`.
    pub month: &'a str,
    /// Tokens the holder used under the lease so far.
    pub used: u64,
}

impl Store {
    /// Draws for `of` from the account's pool: `need` tokens now, ideally `want`, never past
    /// `quota` ([`Rows::draw`]). Returns the rows after the draw, and the tokens granted.
    pub async fn draw_lease(
        &self,
        of: LeaseOf<'_>,
        quota: u64,
        need: u64,
        want: u64,
        now: i64,
    ) -> Result<(Rows, u64), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut r = rows(&mut tx, of.holder, of.account, of.month, quota).await?;
        let grant = r.draw(of.used, need, want);
        write(&mut tx, of.holder, of.account, of.month, &r, now).await?;
        tx.commit().await?;
        Ok((r, grant))
    }

    /// Gives back what `of` holds beyond `keep` tokens ([`Rows::give_back`]). Returns the
    /// rows after, and the tokens given back.
    pub async fn give_back_lease(
        &self,
        of: LeaseOf<'_>,
        keep: u64,
        now: i64,
    ) -> Result<(Rows, u64), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut r = rows(&mut tx, of.holder, of.account, of.month, 0).await?;
        let back = r.give_back(of.used, keep);
        write(&mut tx, of.holder, of.account, of.month, &r, now).await?;
        tx.commit().await?;
        Ok((r, back))
    }

    /// Renews `holder`'s leases in `month`, recording what each account used. Returns the
    /// accounts whose lease the store no longer has (taken back while the holder was silent).
    pub async fn renew_leases(
        &self,
        holder: &str,
        month: &str,
        used: &[(String, u64)],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut lost = Vec::new();
        let mut tx = self.pool.begin().await?;
        for (account, n) in used {
            let done = query(
                "UPDATE quota_leases SET used = $1, renewed_at = $2 WHERE account_id = $3 AND month = $4 AND holder = $5",
            )
            .bind(*n as i64)
            .bind(now)
            .bind(account)
            .bind(month)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                lost.push(account.clone());
            }
        }
        tx.commit().await?;
        Ok(lost)
    }

    /// Takes back the unused part of every lease not renewed since `before` (its edge died or
    /// lost the store), and forgets the lease. Returns the tokens given back to the pools.
    pub async fn reclaim_leases(&self, before: i64) -> Result<u64, StoreError> {
        let stale = self
            .read(
                query("SELECT DISTINCT account_id, month FROM quota_leases WHERE renewed_at < $1")
                    .bind(before),
            )
            .await?;
        let mut back = 0;
        for row in stale {
            let (account, month): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let mut tx = self.pool.begin().await?;
            let mut pool = Rows {
                pool: hold_pool(&mut tx, &account, &month).await?,
                ..Rows::default()
            };
            let gone = query(
                "DELETE FROM quota_leases WHERE account_id = $1 AND month = $2 AND renewed_at < $3 RETURNING granted, used",
            )
            .bind(&account)
            .bind(&month)
            .bind(before)
            .fetch_all(&mut *tx)
            .await?;
            for lease in gone {
                pool.lease = Lease {
                    granted: lease.try_get::<i64, _>(0)? as u64,
                    used: lease.try_get::<i64, _>(1)? as u64,
                };
                back += pool.give_back(pool.lease.used, 0);
            }
            query("UPDATE quota_pools SET leased = $1 WHERE account_id = $2 AND month = $3")
                .bind(pool.pool as i64)
                .bind(&account)
                .bind(&month)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(back)
    }

    /// Tokens leased out of `account`'s pool in `month` (0 when it has none).
    pub async fn pool_leased(&self, account: &str, month: &str) -> Result<u64, StoreError> {
        let rows = self
            .read(
                query("SELECT leased FROM quota_pools WHERE account_id = $1 AND month = $2")
                    .bind(account)
                    .bind(month),
            )
            .await?;
        Ok(rows
            .first()
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
            .unwrap_or(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of<'a>(holder: &'a str, used: u64) -> LeaseOf<'a> {
        LeaseOf {
            holder,
            account: "acct",
            month: "2026-12",
            used,
        }
    }

    #[tokio::test]
    async fn draw_give_back_renew_and_reclaim() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("sqlite://leases.db", dir.path()).await.unwrap();
        let (r, _) = store
            .draw_lease(of("e1", 0), 2_000, 10, 400, 100)
            .await
            .unwrap();
        assert_eq!((r.pool, r.lease.granted), (400, 400));
        let (r, grant) = store
            .draw_lease(of("e2", 0), 2_000, 10, 800, 100)
            .await
            .unwrap();
        assert_eq!(
            (r.lease.granted, grant),
            (400, 400),
            "a quarter of the 1,600 left"
        );
        let (r, back) = store
            .give_back_lease(of("e1", 100), 100, 101)
            .await
            .unwrap();
        assert_eq!((r.pool, r.lease.granted, back), (500, 100, 300));
        assert_eq!(
            store
                .renew_leases(
                    "e2",
                    "2026-12",
                    &[("acct".into(), 50), ("other".into(), 0)],
                    200
                )
                .await
                .unwrap(),
            vec!["other".to_string()]
        );
        // e1 went quiet at 101; e2 renewed at 200. Reclaiming before 150 takes e1's lease,
        // whose tokens were all used: nothing comes back, and the pool keeps what it used.
        assert_eq!(store.reclaim_leases(150).await.unwrap(), 0);
        // Then e2 goes quiet too: the 350 of its 400 it did not use come back.
        assert_eq!(store.reclaim_leases(300).await.unwrap(), 350);
        assert_eq!(store.pool_leased("acct", "2026-12").await.unwrap(), 150);
        let (r, _) = store
            .draw_lease(of("e3", 0), 2_000, 10, 10_000, 400)
            .await
            .unwrap();
        assert_eq!(r.lease.granted, (2_000 - 150) / 4);
    }
}
