//! The usage ledger in the store. What it writes grows with active keys, not with requests
//! (issue 18): a shipment from an edge's journal adds to one rollup row per key, agent and
//! minute (`usage_rollups`, migration `0006_usage_rollups.sql`), moves its journal stream's position forward (which is what makes
//! a replay count nothing twice), and, unless `store.request_rows` is off, appends one narrow
//! row per request for audit and support, found by the client's `x-request-id`.
//!
//! Every read that totals a month (reports, quota pools) reads rollups or running totals, never
//! the per-request rows.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{Any, Row, Transaction};

use super::{query, Store, StoreError};

/// One metered request, as the edge journals it and the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UsageRow {
    /// The edge's unique id for the row: edge, process start, process, counter.
    pub request_id: String,
    /// The request's id as the client was given it (`x-request-id`; empty in rows journaled
    /// before it was kept).
    #[serde(default)]
    pub client_request_id: String,
    /// Which edge served it.
    pub edge_id: String,
    /// Paying account.
    pub account_id: String,
    /// Key used.
    pub key_id: String,
    /// Agent called.
    pub agent_id: String,
    /// `YYYY-MM`, UTC.
    pub month: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total.
    pub total_tokens: u64,
    /// Whether the edge estimated the counts (the runtime gave none).
    pub estimated: bool,
    /// How the request ended.
    pub outcome: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A run of rows from one stream (a journal segment, or rows the edge had to keep in memory),
/// each with its position in the stream. Positions only grow along a stream, and a stream
/// never changes behind a position once shipped, so the store counts a row when its position
/// is at or past how far the stream is counted.
#[derive(Debug)]
pub struct Shipment<'a> {
    /// The stream's name, unique across the fleet and restarts (its first row's id).
    pub stream: &'a str,
    /// The edge the stream belongs to.
    pub edge_id: &'a str,
    /// The rows, in stream order, with their positions.
    pub rows: &'a [(u64, UsageRow)],
    /// The position just past the run: how far the stream is counted once this is written.
    pub end: u64,
}

/// How a usage report is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageBy {
    /// Per account.
    Account,
    /// Per key.
    Key,
    /// Per agent.
    Agent,
}

/// One line of a usage report.
#[derive(Debug, Clone, Serialize)]
pub struct UsageLine {
    /// Account.
    pub account_id: String,
    /// The group's id (account, key or agent).
    pub group: String,
    /// Requests.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Requests whose counts the edge estimated.
    pub estimated_requests: u64,
}

/// Rows per multi-row statement: at most 11 parameters a row, within SQLite's 32,766 and
/// PostgreSQL's 65,535 parameters per statement.
const CHUNK: usize = 1000;

/// `head` followed by `n` rows of `columns` placeholders, then `tail`. SQLite gets anonymous
/// `?` placeholders: it looks each `$N` up by name in a list, which makes a statement of
/// thousands of them take a second to prepare (measured: 680 ms for 1,000 rows, 10 ms with
/// `?`).
fn values_sql(head: &str, n: usize, columns: usize, tail: &str, postgres: bool) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + n * columns * 6);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for row in 0..n {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..columns {
            if col > 0 {
                sql.push_str(", ");
            }
            if postgres {
                sql.push('$');
                sql.push_str(&(row * columns + col + 1).to_string());
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql.push(' ');
    sql.push_str(tail);
    sql
}

/// What a rollup row adds up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    requests: i64,
    prompt: i64,
    completion: i64,
    total: i64,
    estimated: i64,
}

/// A rollup row's key: account, month, minute, key, agent, edge.
type RollupKey<'a> = (&'a str, &'a str, i64, &'a str, &'a str, &'a str);

/// `rows` summed per rollup row (sorted, so that concurrent shipments lock rows in one order).
fn rollups<'a>(rows: &[&'a UsageRow]) -> BTreeMap<RollupKey<'a>, Sums> {
    let mut out: BTreeMap<RollupKey<'a>, Sums> = BTreeMap::new();
    for r in rows {
        let minute = r.created_at - r.created_at.rem_euclid(60);
        let key = (
            r.account_id.as_str(),
            r.month.as_str(),
            minute,
            r.key_id.as_str(),
            r.agent_id.as_str(),
            r.edge_id.as_str(),
        );
        let s = out.entry(key).or_default();
        s.requests += 1;
        s.prompt += r.prompt_tokens as i64;
        s.completion += r.completion_tokens as i64;
        s.total += r.total_tokens as i64;
        s.estimated += i64::from(r.estimated);
    }
    out
}

impl Store {
    /// Counts a shipment's rows that the store has not counted yet, and moves its stream's
    /// position to `end`, in one transaction; returns the rows counted (0 for a replay).
    pub async fn ship_usage(&self, s: &Shipment<'_>) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        // An upsert, not a read: it holds the stream's row (on SQLite, the write lock) until
        // commit, so two processes shipping one stream count it once.
        let counted: i64 = query(
            "INSERT INTO usage_streams (stream, edge_id, shipped, updated_at) VALUES ($1, $2, 0, $3) \
             ON CONFLICT (stream) DO UPDATE SET updated_at = excluded.updated_at RETURNING shipped",
        )
        .bind(s.stream)
        .bind(s.edge_id)
        .bind(super::now())
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        let counted = counted as u64;
        if s.end <= counted {
            tx.commit().await?;
            return Ok(0);
        }
        let fresh: Vec<&UsageRow> = s
            .rows
            .iter()
            .filter(|(at, _)| *at >= counted)
            .map(|(_, r)| r)
            .collect();
        self.add_rollups(&mut tx, &fresh).await?;
        self.add_totals(&mut tx, &fresh).await?;
        if self.request_rows {
            self.append_requests(&mut tx, &fresh).await?;
        }
        query("UPDATE usage_streams SET shipped = $1 WHERE stream = $2")
            .bind(s.end as i64)
            .bind(s.stream)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(fresh.len())
    }

    /// Adds `rows` to their rollups, one upsert for every [`CHUNK`] rollup rows.
    async fn add_rollups(
        &self,
        tx: &mut Transaction<'_, Any>,
        rows: &[&UsageRow],
    ) -> Result<(), StoreError> {
        let sums: Vec<_> = rollups(rows).into_iter().collect();
        for chunk in sums.chunks(CHUNK) {
            let sql = values_sql(
                "INSERT INTO usage_rollups (account_id, month, minute, key_id, agent_id, edge_id, \
                 requests, prompt_tokens, completion_tokens, total_tokens, estimated)",
                chunk.len(),
                11,
                "ON CONFLICT (account_id, month, minute, key_id, agent_id, edge_id) DO UPDATE SET \
                 requests = usage_rollups.requests + excluded.requests, \
                 prompt_tokens = usage_rollups.prompt_tokens + excluded.prompt_tokens, \
                 completion_tokens = usage_rollups.completion_tokens + excluded.completion_tokens, \
                 total_tokens = usage_rollups.total_tokens + excluded.total_tokens, \
                 estimated = usage_rollups.estimated + excluded.estimated",
                self.postgres,
            );
            let mut q = query(&sql);
            for ((account, month, minute, key, agent, edge), s) in chunk {
                q = q
                    .bind(*account)
                    .bind(*month)
                    .bind(*minute)
                    .bind(*key)
                    .bind(*agent)
                    .bind(*edge)
                    .bind(s.requests)
                    .bind(s.prompt)
                    .bind(s.completion)
                    .bind(s.total)
                    .bind(s.estimated);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Moves the running totals per account, month and edge (what quota pools open from).
    async fn add_totals(
        &self,
        tx: &mut Transaction<'_, Any>,
        rows: &[&UsageRow],
    ) -> Result<(), StoreError> {
        let mut totals: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
        for r in rows {
            *totals
                .entry((&r.account_id, &r.month, &r.edge_id))
                .or_default() += r.total_tokens as i64;
        }
        let totals: Vec<_> = totals.into_iter().collect();
        for chunk in totals.chunks(CHUNK) {
            let sql = values_sql(
                "INSERT INTO usage_totals (account_id, month, edge_id, total_tokens)",
                chunk.len(),
                4,
                "ON CONFLICT (account_id, month, edge_id) DO UPDATE SET \
                 total_tokens = usage_totals.total_tokens + excluded.total_tokens",
                self.postgres,
            );
            let mut q = query(&sql);
            for ((account, month, edge), total) in chunk {
                q = q.bind(*account).bind(*month).bind(*edge).bind(*total);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Appends one audit row per request, in one statement whose one parameter is the rows as
    /// a JSON array, taken apart by the database (`json_to_recordset`, `json_each`): binding
    /// 13 parameters a row made PostgreSQL spend ~14 µs a request parsing and binding.
    async fn append_requests(
        &self,
        tx: &mut Transaction<'_, Any>,
        rows: &[&UsageRow],
    ) -> Result<(), StoreError> {
        const COLUMNS: &str = "request_id, client_request_id, edge_id, account_id, key_id, \
             agent_id, month, prompt_tokens, completion_tokens, total_tokens, estimated, outcome, \
             created_at";
        let sql = if self.postgres {
            format!(
                "INSERT INTO usage_requests ({COLUMNS}) SELECT request_id, client_request_id, \
                 edge_id, account_id, key_id, agent_id, month, prompt_tokens, completion_tokens, \
                 total_tokens, CASE WHEN estimated THEN 1 ELSE 0 END, outcome, created_at \
                 FROM json_to_recordset(CAST($1 AS json)) AS r(request_id TEXT, \
                 client_request_id TEXT, edge_id TEXT, account_id TEXT, key_id TEXT, \
                 agent_id TEXT, month TEXT, prompt_tokens BIGINT, completion_tokens BIGINT, \
                 total_tokens BIGINT, estimated BOOLEAN, outcome TEXT, created_at BIGINT)"
            )
        } else {
            let fields: Vec<String> = COLUMNS
                .split(',')
                .map(|c| format!("json_extract(value, '$.{}')", c.trim()))
                .collect();
            format!(
                "INSERT INTO usage_requests ({COLUMNS}) SELECT {} FROM json_each(?)",
                fields.join(", ")
            )
        };
        let json = serde_json::to_string(rows)
            .map_err(|e| StoreError::Db(sqlx::Error::Encode(e.into())))?;
        query(&sql).bind(json).execute(&mut **tx).await?;
        Ok(())
    }

    /// The ledger's running totals for `month` per account: (account, by this edge, by the
    /// others). A quota pool opens from their sum (`store/leases.rs`); this read checks them.
    pub async fn month_totals(
        &self,
        month: &str,
        edge_id: &str,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let rows = query(
            "SELECT account_id, \
                    CAST(SUM(CASE WHEN edge_id = $1 THEN total_tokens ELSE 0 END) AS BIGINT), \
                    CAST(SUM(CASE WHEN edge_id = $2 THEN 0 ELSE total_tokens END) AS BIGINT) \
             FROM usage_totals WHERE month = $3 GROUP BY account_id",
        )
        .bind(edge_id)
        .bind(edge_id)
        .bind(month);
        let rows = self.read(rows).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)?,
                    r.try_get::<i64, _>(1)? as u64,
                    r.try_get::<i64, _>(2)? as u64,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Usage summed by `by` (`account`, `key` or `agent`) for `month`, optionally one
    /// account's, from the rollups.
    pub async fn usage_report(
        &self,
        month: &str,
        account: Option<&str>,
        by: UsageBy,
    ) -> Result<Vec<UsageLine>, StoreError> {
        let col = match by {
            UsageBy::Account => "account_id",
            UsageBy::Key => "key_id",
            UsageBy::Agent => "agent_id",
        };
        let sql = format!(
            "SELECT account_id, {col}, CAST(SUM(requests) AS BIGINT), CAST(SUM(prompt_tokens) AS BIGINT), \
             CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(total_tokens) AS BIGINT), CAST(SUM(estimated) AS BIGINT) \
             FROM usage_rollups WHERE month = $1 AND ($2 = '' OR account_id = $3) GROUP BY account_id, {col} ORDER BY account_id, {col}"
        );
        let acct = account.unwrap_or("");
        let rows = self
            .read(query(&sql).bind(month).bind(acct).bind(acct))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageLine {
                    account_id: r.try_get(0)?,
                    group: r.try_get(1)?,
                    requests: r.try_get::<i64, _>(2)? as u64,
                    prompt_tokens: r.try_get::<i64, _>(3)? as u64,
                    completion_tokens: r.try_get::<i64, _>(4)? as u64,
                    total_tokens: r.try_get::<i64, _>(5)? as u64,
                    estimated_requests: r.try_get::<i64, _>(6)? as u64,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// The audit rows of the request the client knows by `client_request_id` (its
    /// `x-request-id`): none when it used no tokens, when its edge has not shipped it yet, or
    /// when `store.request_rows` is off; more than one only when a client gave several requests
    /// the same id.
    pub async fn usage_of_request(
        &self,
        client_request_id: &str,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let rows = query(
            "SELECT request_id, client_request_id, edge_id, account_id, key_id, agent_id, month, \
             prompt_tokens, completion_tokens, total_tokens, estimated, outcome, created_at \
             FROM usage_requests WHERE client_request_id = $1 ORDER BY created_at, request_id",
        )
        .bind(client_request_id);
        let rows = self.read(rows).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    request_id: r.try_get(0)?,
                    client_request_id: r.try_get(1)?,
                    edge_id: r.try_get(2)?,
                    account_id: r.try_get(3)?,
                    key_id: r.try_get(4)?,
                    agent_id: r.try_get(5)?,
                    month: r.try_get(6)?,
                    prompt_tokens: r.try_get::<i64, _>(7)? as u64,
                    completion_tokens: r.try_get::<i64, _>(8)? as u64,
                    total_tokens: r.try_get::<i64, _>(9)? as u64,
                    estimated: r.try_get::<i32, _>(10)? != 0,
                    outcome: r.try_get(11)?,
                    created_at: r.try_get(12)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, at: i64, total: u64, estimated: bool) -> UsageRow {
        UsageRow {
            request_id: format!("e1-{at}"),
            client_request_id: String::new(),
            edge_id: "e1".into(),
            account_id: "acct".into(),
            key_id: key.into(),
            agent_id: "a".into(),
            month: "2026-12".into(),
            prompt_tokens: 1,
            completion_tokens: total - 1,
            total_tokens: total,
            estimated,
            outcome: "completed".into(),
            created_at: at,
        }
    }

    #[test]
    fn requests_sum_into_one_rollup_per_key_and_minute() {
        let rows = [
            row("k1", 1_790_000_000, 3, false), // minute 1_789_999_980
            row("k1", 1_790_000_039, 4, true),  // same minute
            row("k1", 1_790_000_040, 5, false), // the next
            row("k2", 1_790_000_001, 6, false),
        ];
        let refs: Vec<&UsageRow> = rows.iter().collect();
        let sums = rollups(&refs);
        assert_eq!(sums.len(), 3);
        let first = sums[&("acct", "2026-12", 1_789_999_980, "k1", "a", "e1")];
        assert_eq!(
            first,
            Sums {
                requests: 2,
                prompt: 2,
                completion: 5,
                total: 7,
                estimated: 1
            }
        );
        assert_eq!(
            sums[&("acct", "2026-12", 1_790_000_040, "k1", "a", "e1")].total,
            5
        );
    }

    #[test]
    fn placeholders_are_numbered_on_postgres_and_anonymous_on_sqlite() {
        assert_eq!(
            values_sql("INSERT INTO t (a, b)", 2, 2, "", true),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) "
        );
        assert_eq!(
            values_sql("INSERT INTO t (a)", 2, 1, "ON CONFLICT DO NOTHING", false),
            "INSERT INTO t (a) VALUES (?), (?) ON CONFLICT DO NOTHING"
        );
    }
}
