//! What shipping the usage ledger costs PostgreSQL, per request: the edge's own path (rows
//! journaled by [`Ledger::record`], shipped by [`Journal::ship`]) into a database of its own.
//!
//! ```text
//! cargo run --release --example ledger_bench -- [--server postgres://postgres@127.0.0.1:5432]
//!     [--rows 200000] [--batch 100] [--keys 10] [--request-rows true] [--json out.json]
//! ```
//!
//! `--request-rows false` ships as `store.request_rows = false` does: rollups only.
//! `--batch` rows are journaled between two shipments (an edge ships every
//! `limits.fleet_sync`, 500 ms: 100 rows is 200 requests a second), spread over `--keys` keys.
//! Measures, per request: the CPU of every PostgreSQL process on this machine (the backend, its
//! WAL writer and checkpointer; run it on an otherwise idle server), the WAL written, the rows
//! written and the bytes the usage tables grew by; and the shipper's own CPU.

use std::time::Instant;

use moltghost::ledger::{Journal, Ledger, Payer};
use moltghost::store::Store;
use moltghost::usage::Usage;
use sqlx::{Connection, Row};

struct Args {
    server: String,
    rows: usize,
    batch: usize,
    keys: usize,
    request_rows: bool,
    json: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        server: "postgres://postgres@127.0.0.1:5432".into(),
        rows: 200_000,
        batch: 100,
        keys: 10,
        request_rows: true,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => a.server = value,
            "--rows" => a.rows = value.parse().expect("--rows N"),
            "--batch" => a.batch = value.parse().expect("--batch N"),
            "--keys" => a.keys = value.parse().expect("--keys N"),
            "--request-rows" => a.request_rows = value.parse().expect("--request-rows true|false"),
            "--json" => a.json = Some(value),
            _ => panic!("unknown flag {flag}"),
        }
    }
    a
}

/// CPU seconds used so far by every process named `postgres*` on this machine.
fn postgres_cpu() -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.contains("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state is field 3, utime 14 and stime 15 (1-based, man proc).
        let t = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        total += t(14).unwrap_or(0) + t(15).unwrap_or(0);
    }
    total as f64 / tick
}

/// This process's CPU seconds.
fn own_cpu() -> f64 {
    let mut u = libc::rusage {
        ..unsafe { std::mem::zeroed() }
    };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// The server's WAL position, in bytes.
async fn wal(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query("SELECT CAST(pg_current_wal_lsn() - '0/0' AS BIGINT)")
        .fetch_one(conn)
        .await
        .unwrap()
        .get(0)
}

/// Rows written and bytes held by the current database's tables.
async fn written(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    let r = sqlx::query(
        "SELECT CAST(COALESCE(SUM(n_tup_ins + n_tup_upd), 0) AS BIGINT), \
                CAST(COALESCE(SUM(pg_total_relation_size(relid)), 0) AS BIGINT) \
         FROM pg_stat_user_tables",
    )
    .fetch_one(conn)
    .await
    .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::main]
async fn main() {
    let a = args();
    let db = format!("ledger_bench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", a.server))
        .await
        .expect("PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", a.server);
    let dir = tempfile::tempdir().unwrap();
    let config = moltghost::config::Config::from_toml(&format!(
        "[store]\nurl = \"{url}\"\nrequest_rows = {}",
        a.request_rows
    ))
    .unwrap();
    let store = Store::open_configured(&config.fixed.store, dir.path())
        .await
        .unwrap();
    let ledger = Ledger::new(Journal::open(dir.path()).unwrap(), "edge-1".into());
    let payers: Vec<Payer> = (0..a.keys)
        .map(|k| Payer {
            request_id: String::new(),
            account_id: format!("acct-{}", k % 3),
            key_id: format!("key-{k}"),
            agent_id: "agent-1".into(),
        })
        .collect();
    let usage = Usage {
        prompt_tokens: 12,
        completion_tokens: 9,
        total_tokens: 21,
    };
    let mut stats = sqlx::PgConnection::connect(&url).await.unwrap();
    // Warm up: the schema's first writes, the statement caches.
    for n in 0..a.batch {
        let mut p = payers[n % a.keys].clone();
        p.request_id = format!("warm-{n}");
        ledger.record(&p, usage, false, "completed");
    }
    ledger.journal.ship(&store).await.unwrap();
    let (rows0, bytes0) = written(&mut stats).await;
    let (wal0, pg0, own0, t0) = (
        wal(&mut stats).await,
        postgres_cpu(),
        own_cpu(),
        Instant::now(),
    );
    let mut shipped = 0;
    for n in 0..a.rows {
        let mut p = payers[n % a.keys].clone();
        p.request_id = format!("req-{n:08}");
        ledger.record(&p, usage, false, "completed");
        if (n + 1) % a.batch == 0 || n + 1 == a.rows {
            shipped += ledger.journal.ship(&store).await.unwrap();
        }
    }
    let (secs, pg, own) = (
        t0.elapsed().as_secs_f64(),
        postgres_cpu() - pg0,
        own_cpu() - own0,
    );
    // Statistics reach pg_stat_user_tables within a second of each statement.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let wal_bytes = wal(&mut stats).await - wal0;
    let (rows1, bytes1) = written(&mut stats).await;
    assert_eq!(shipped, a.rows);
    let n = a.rows as f64;
    let line = serde_json::json!({
        "rows": a.rows, "batch": a.batch, "keys": a.keys, "request_rows": a.request_rows, "seconds": secs,
        "postgres_cpu_us_per_request": pg / n * 1e6,
        "shipper_cpu_us_per_request": own / n * 1e6,
        "wal_bytes_per_request": wal_bytes as f64 / n,
        "rows_written_per_request": (rows1 - rows0) as f64 / n,
        "table_bytes_per_request": (bytes1 - bytes0) as f64 / n,
    });
    println!("{line}");
    if let Some(path) = a.json {
        std::fs::write(path, format!("{line}\n")).unwrap();
    }
    drop((store, stats));
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
