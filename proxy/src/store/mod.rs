//! The control-plane store: one schema behind one interface, on SQLite (a file in the data
//! directory, the default) or PostgreSQL (a fleet). Every change bumps a revision in the same
//! transaction, and on PostgreSQL notifies every edge (`LISTEN moltghost_changes`).
//!
//! Only the control plane calls this module; requests are served from the snapshot.

use std::path::Path;

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row};

mod leases;
mod status;
mod usage;
pub use leases::LeaseOf;
pub use status::StoreStatus;
pub use usage::{Shipment, UsageBy, UsageLine, UsageRow};

/// The notification channel on PostgreSQL.
pub const CHANNEL: &str = "moltghost_changes";

pub use moltghost_common::now;

/// A store error, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A unique name or id is taken.
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// An account row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccountRow {
    /// Id, part of every key: `molti_<id>_…`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Plan name (declared in config).
    pub plan: String,
    /// Creation time.
    pub created_at: i64,
}

/// An agent row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentRow {
    /// Endpoint id: the host label.
    pub endpoint_id: String,
    /// Unique name.
    pub name: String,
    /// Owning account.
    pub account_id: String,
    /// Upstream as configured (`http://…`).
    pub upstream: String,
    /// Lifecycle state.
    pub state: String,
    /// Creation time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

/// An API key row. The key itself is never stored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyRow {
    /// Key id (`key_…`), safe to show and log.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// Human name.
    pub name: String,
    /// HMAC-SHA-256 of the key, hex.
    #[serde(skip)]
    pub hash: String,
    /// Recognisable start of the key (`molti_acct_AbCdEf…`).
    pub prefix: String,
    /// Endpoint ids in scope; empty means every agent of the account.
    pub agents: Vec<String>,
    /// Creation time.
    pub created_at: i64,
    /// Last use (written in batches).
    pub last_used_at: Option<i64>,
    /// Expiry, if any.
    pub expires_at: Option<i64>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// Everything the snapshot is built from, read in one transaction.
#[derive(Debug, Default)]
pub struct Contents {
    /// The revision these rows are at.
    pub revision: i64,
    /// All accounts.
    pub accounts: Vec<AccountRow>,
    /// All agents.
    pub agents: Vec<AgentRow>,
    /// Keys not revoked.
    pub keys: Vec<KeyRow>,
}

/// The store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    postgres: bool,
    /// Where sessions of their own are opened (`store.session_url`, else the pool's URL).
    session_url: String,
    /// Whether shipments append a row per request (`store.request_rows`).
    request_rows: bool,
}

fn account(r: &AnyRow) -> Result<AccountRow, sqlx::Error> {
    Ok(AccountRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        plan: r.try_get(2)?,
        created_at: r.try_get(3)?,
    })
}

fn agent(r: &AnyRow) -> Result<AgentRow, sqlx::Error> {
    Ok(AgentRow {
        endpoint_id: r.try_get(0)?,
        name: r.try_get(1)?,
        account_id: r.try_get(2)?,
        upstream: r.try_get(3)?,
        state: r.try_get(4)?,
        created_at: r.try_get(5)?,
        updated_at: r.try_get(6)?,
    })
}

fn key(r: &AnyRow) -> Result<KeyRow, sqlx::Error> {
    let agents: String = r.try_get(5)?;
    Ok(KeyRow {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        name: r.try_get(2)?,
        hash: r.try_get(3)?,
        prefix: r.try_get(4)?,
        agents: agents
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        created_at: r.try_get(6)?,
        last_used_at: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        revoked_at: r.try_get(9)?,
    })
}

const ACCOUNT_COLS: &str = "id, name, plan, created_at";
const AGENT_COLS: &str = "endpoint_id, name, account_id, upstream, state, created_at, updated_at";
const KEY_COLS: &str =
    "id, account_id, name, hash, prefix, agents, created_at, last_used_at, expires_at, revoked_at";

fn conflict(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what()),
        _ => StoreError::Db(e),
    }
}

/// `url` fit for a message or a log: its password, if any, replaced by `***`.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A statement, never kept prepared on its connection: behind a pooler in transaction mode
/// (PgBouncer) a pooled connection is another server session in each transaction, where a
/// statement another client prepared may bear the same name.
fn query(sql: &str) -> Query<'_> {
    sqlx::query(sql).persistent(false)
}

/// A statement with its arguments.
type Query<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

impl Store {
    /// Runs one read in a transaction of its own: a statement takes more than one round trip,
    /// and behind a pooler in transaction mode only a transaction keeps them on one session.
    async fn read(&self, q: Query<'_>) -> Result<Vec<AnyRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Connects to `url` (`sqlite://PATH`, relative to `data_dir`, or `postgres://…`) with the
    /// default pool and brings the schema up to date.
    pub async fn open(url: &str, data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_pooled(url, data_dir, None, None).await
    }

    /// The store `[store]` describes (`settings`), relative paths inside `data_dir`.
    pub async fn open_configured(
        settings: &crate::config::StoreSettings,
        data_dir: &Path,
    ) -> Result<Self, StoreError> {
        let s = settings;
        let store = Self::open_pooled(
            &s.url,
            data_dir,
            s.max_connections,
            s.session_url.as_deref(),
        )
        .await?;
        Ok(Self {
            request_rows: s.request_rows,
            ..store
        })
    }

    /// As [`Store::open`], with at most `max_connections` in the pool (`None`: 8 to
    /// PostgreSQL, 4 to SQLite), and, where `url` is a pooler in transaction mode (PgBouncer),
    /// `session_url` for what needs a session of its own: the migrations' advisory lock and
    /// LISTEN (`None`: `url` itself).
    async fn open_pooled(
        url: &str,
        data_dir: &Path,
        max_connections: Option<u32>,
        session_url: Option<&str>,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres");
        let url = if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let (path, _) = path.split_once('?').unwrap_or((path, ""));
            let path = if Path::new(path).is_absolute() {
                path.into()
            } else {
                data_dir.join(path)
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
            }
            format!("sqlite://{}?mode=rwc", path.display())
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.unwrap_or(if postgres { 8 } else { 4 }))
            // Fail fast when the store is gone: the edge keeps serving from its snapshot.
            .acquire_timeout(std::time::Duration::from_secs(3))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if !postgres {
                        // WAL lets several edges (and the CLI) read while one writes.
                        query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                        query("PRAGMA busy_timeout=5000")
                            .execute(&mut *conn)
                            .await?;
                        query("PRAGMA foreign_keys=ON").execute(&mut *conn).await?;
                        query("PRAGMA synchronous=NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let store = Self {
            pool,
            postgres,
            session_url: session_url.map_or(url, str::to_owned),
            request_rows: true,
        };
        // One portable schema serves both backends. The migrator holds an advisory lock (so
        // that edges starting together migrate once), which lives in a session.
        if session_url.is_some() {
            use sqlx::Connection;
            let mut conn = sqlx::AnyConnection::connect(&store.session_url).await?;
            sqlx::migrate!().run_direct(&mut conn).await?;
            conn.close().await?;
        } else {
            sqlx::migrate!().run(&store.pool).await?;
        }
        Ok(store)
    }

    /// Whether this is PostgreSQL (changes are notified).
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// A URL whose connections are sessions of their own (for the change listener).
    pub fn session_url(&self) -> &str {
        &self.session_url
    }

    /// The current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let rows = self
            .read(query("SELECT value FROM revision WHERE id = 1"))
            .await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        Ok(row.try_get(0)?)
    }

    /// Everything, consistently.
    pub async fn contents(&self) -> Result<Contents, StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision: i64 = query("SELECT value FROM revision WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let accounts = query(&format!("SELECT {ACCOUNT_COLS} FROM accounts"))
            .fetch_all(&mut *tx)
            .await?;
        let agents = query(&format!("SELECT {AGENT_COLS} FROM agents"))
            .fetch_all(&mut *tx)
            .await?;
        let keys = query(&format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE revoked_at IS NULL"
        ))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Contents {
            revision,
            accounts: accounts.iter().map(account).collect::<Result<_, _>>()?,
            agents: agents.iter().map(agent).collect::<Result<_, _>>()?,
            keys: keys.iter().map(key).collect::<Result<_, _>>()?,
        })
    }

    /// Runs `change` in a transaction that also bumps the revision and notifies the fleet.
    async fn change<T>(
        &self,
        change: impl for<'c> FnOnce(
            &'c mut sqlx::AnyConnection,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
        >,
    ) -> Result<T, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The write comes first: on SQLite a transaction that begins with a read fails at its
        // first write (SQLITE_BUSY, without waiting) if another connection wrote meanwhile.
        let rev: i64 = query("UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let out = change(&mut tx).await?;
        if self.postgres {
            query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(rev.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Runs one `UPDATE` that must touch a row, as a change; `what` names the row for the
    /// not-found error. Parameters are bound in order.
    async fn update_one(
        &self,
        sql: &'static str,
        params: Vec<Param>,
        what: String,
    ) -> Result<(), StoreError> {
        self.change(move |c| {
            Box::pin(async move {
                let mut q = query(sql);
                for p in params {
                    q = match p {
                        Param::Text(t) => q.bind(t),
                        Param::Int(i) => q.bind(i),
                    };
                }
                if q.execute(&mut *c).await?.rows_affected() == 0 {
                    return Err(StoreError::NotFound(what));
                }
                Ok(())
            })
        })
        .await
    }

    // ------------------------------------------------------------------ accounts

    /// All accounts.
    pub async fn accounts(&self) -> Result<Vec<AccountRow>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY created_at, name");
        let rows = self.read(query(&sql)).await?;
        Ok(rows.iter().map(account).collect::<Result<_, _>>()?)
    }

    /// Creates an account.
    pub async fn create_account(&self, row: AccountRow) -> Result<AccountRow, StoreError> {
        let r = row.clone();
        self.change(move |c| {
            Box::pin(async move {
                query("INSERT INTO accounts (id, name, plan, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(&r.id)
                    .bind(&r.name)
                    .bind(&r.plan)
                    .bind(r.created_at)
                    .execute(&mut *c)
                    .await
                    .map_err(|e| conflict(e, || format!("an account named {:?} exists", r.name)))?;
                Ok(())
            })
        })
        .await?;
        Ok(row)
    }

    /// Creates, in one change, the accounts and agents a config declares where the store lacks
    /// them. Each agent names its account by name or id (`account_id` is filled in here). Edges
    /// of a fleet start together and declare the same rows: a row another edge created first is
    /// kept, not an error; an agent whose name is taken at another endpoint still is.
    pub async fn declare(
        &self,
        accounts: Vec<AccountRow>,
        agents: Vec<(AgentRow, String)>,
    ) -> Result<(), StoreError> {
        self.change(move |c| {
            Box::pin(async move {
                for r in &accounts {
                    query(
                        "INSERT INTO accounts (id, name, plan, created_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&r.id)
                    .bind(&r.name)
                    .bind(&r.plan)
                    .bind(r.created_at)
                    .execute(&mut *c)
                    .await?;
                }
                for (r, account) in &agents {
                    // The account is looked up in the statement, so one another edge created a
                    // moment ago is found.
                    query(
                        "INSERT INTO agents (endpoint_id, name, account_id, upstream, state, created_at, updated_at) \
                         SELECT $1, $2, id, $3, $4, $5, $6 FROM accounts WHERE id = $7 OR name = $7 LIMIT 1 \
                         ON CONFLICT (endpoint_id) DO NOTHING",
                    )
                    .bind(&r.endpoint_id)
                    .bind(&r.name)
                    .bind(&r.upstream)
                    .bind(&r.state)
                    .bind(r.created_at)
                    .bind(r.updated_at)
                    .bind(account)
                    .execute(&mut *c)
                    .await
                    .map_err(|e| conflict(e, || format!("an agent named {:?} exists at another endpoint than {:?}", r.name, r.endpoint_id)))?;
                    let found = query("SELECT 1 FROM agents WHERE endpoint_id = $1")
                        .bind(&r.endpoint_id)
                        .fetch_optional(&mut *c)
                        .await?;
                    if found.is_none() {
                        return Err(StoreError::NotFound(format!("account {account}")));
                    }
                }
                Ok(())
            })
        })
        .await
    }

    /// Changes an account's plan.
    pub async fn set_account_plan(&self, id: &str, plan: &str) -> Result<(), StoreError> {
        let params = vec![Param::Text(plan.into()), Param::Text(id.into())];
        self.update_one(
            "UPDATE accounts SET plan = $1 WHERE id = $2",
            params,
            format!("account {id}"),
        )
        .await
    }

    // ------------------------------------------------------------------ agents

    /// All agents.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let sql = format!("SELECT {AGENT_COLS} FROM agents ORDER BY created_at, name");
        let rows = self.read(query(&sql)).await?;
        Ok(rows.iter().map(agent).collect::<Result<_, _>>()?)
    }

    /// Creates an agent.
    pub async fn create_agent(&self, row: AgentRow) -> Result<AgentRow, StoreError> {
        let r = row.clone();
        self.change(move |c| {
            Box::pin(async move {
                query(
                    "INSERT INTO agents (endpoint_id, name, account_id, upstream, state, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&r.endpoint_id)
                .bind(&r.name)
                .bind(&r.account_id)
                .bind(&r.upstream)
                .bind(&r.state)
                .bind(r.created_at)
                .bind(r.updated_at)
                .execute(&mut *c)
                .await
                .map_err(|e| conflict(e, || format!("an agent named {:?} or at endpoint {:?} exists", r.name, r.endpoint_id)))?;
                Ok(())
            })
        })
        .await?;
        Ok(row)
    }

    /// Sets an agent's state (the caller has checked the transition).
    pub async fn set_agent_state(&self, endpoint_id: &str, state: &str) -> Result<(), StoreError> {
        let params = vec![
            Param::Text(state.into()),
            Param::Int(now()),
            Param::Text(endpoint_id.into()),
        ];
        self.update_one(
            "UPDATE agents SET state = $1, updated_at = $2 WHERE endpoint_id = $3",
            params,
            format!("agent {endpoint_id}"),
        )
        .await
    }

    /// Points an agent at another upstream.
    pub async fn set_agent_upstream(
        &self,
        endpoint_id: &str,
        upstream: &str,
    ) -> Result<(), StoreError> {
        let params = vec![
            Param::Text(upstream.into()),
            Param::Int(now()),
            Param::Text(endpoint_id.into()),
        ];
        self.update_one(
            "UPDATE agents SET upstream = $1, updated_at = $2 WHERE endpoint_id = $3",
            params,
            format!("agent {endpoint_id}"),
        )
        .await
    }

    // ------------------------------------------------------------------ keys

    /// All keys, revoked ones included.
    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = format!("SELECT {KEY_COLS} FROM api_keys ORDER BY created_at, id");
        let rows = self.read(query(&sql)).await?;
        Ok(rows.iter().map(key).collect::<Result<_, _>>()?)
    }

    /// Stores a new key (its hash only).
    pub async fn create_key(&self, row: KeyRow) -> Result<KeyRow, StoreError> {
        let r = row.clone();
        self.change(move |c| {
            Box::pin(async move {
                query(
                    "INSERT INTO api_keys (id, account_id, name, hash, prefix, agents, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&r.id)
                .bind(&r.account_id)
                .bind(&r.name)
                .bind(&r.hash)
                .bind(&r.prefix)
                .bind(r.agents.join(","))
                .bind(r.created_at)
                .bind(r.expires_at)
                .execute(&mut *c)
                .await?;
                Ok(())
            })
        })
        .await?;
        Ok(row)
    }

    /// Revokes the key with this id or hash; returns its id.
    pub async fn revoke_key(&self, id_or_hash: &str) -> Result<String, StoreError> {
        let k = id_or_hash.to_owned();
        self.change(move |c| {
            Box::pin(async move {
                let row = query("SELECT id, revoked_at FROM api_keys WHERE id = $1 OR hash = $2")
                    .bind(&k)
                    .bind(&k)
                    .fetch_optional(&mut *c)
                    .await?
                    .ok_or_else(|| StoreError::NotFound("key".into()))?;
                let id: String = row.try_get(0)?;
                query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                    .bind(now())
                    .bind(&id)
                    .execute(&mut *c)
                    .await?;
                Ok(id)
            })
        })
        .await
    }

    /// Records last-used times in one batch (not a change: no revision bump).
    pub async fn touch_keys(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, at) in used {
            query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $3)")
                .bind(*at)
                .bind(id)
                .bind(*at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ------------------------------------------------------------------ usage and fleet

    /// Publishes this edge's per-key request rates, and reads the other edges' fresh ones
    /// (updated within `fresh_secs`).
    pub async fn exchange_fleet_state(
        &self,
        edge_id: &str,
        rates: &[(String, u64)],
        now: i64,
        fresh_secs: i64,
    ) -> Result<FleetState, StoreError> {
        let mut tx = self.pool.begin().await?;
        for (key, n) in rates {
            query(
                "INSERT INTO fleet_rates (edge_id, key_id, requests, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (edge_id, key_id) DO UPDATE SET requests = excluded.requests, updated_at = excluded.updated_at",
            )
            .bind(edge_id)
            .bind(key)
            .bind(*n as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let rates = query("SELECT key_id, CAST(SUM(requests) AS BIGINT) FROM fleet_rates WHERE edge_id <> $1 AND updated_at >= $2 GROUP BY key_id")
            .bind(edge_id)
            .bind(now - fresh_secs)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let rates = rates
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(FleetState { rates })
    }
}

/// A bound parameter of [`Store::update_one`].
enum Param {
    Text(String),
    Int(i64),
}

/// What the other edges of a fleet are doing.
#[derive(Debug, Default, Clone)]
pub struct FleetState {
    /// Per key: the others' one-minute request counts.
    pub rates: Vec<(String, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_messages_hide_their_password() {
        assert_eq!(
            redacted("postgres://edge:s3cret@db:5432/moltghost"),
            "postgres://edge:***@db:5432/moltghost"
        );
        assert_eq!(redacted("postgres://edge@db/m"), "postgres://edge@db/m");
        assert_eq!(redacted("sqlite://moltghost.db"), "sqlite://moltghost.db");
    }
}
